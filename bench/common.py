"""Shared benchmark helpers: in-process hardware ceilings, timers, tables and JSON results.

Ceilings (matmul FLOP/s, copy bandwidth) are measured in the same process and the same run
as the model timings, so utilisation numbers stay meaningful on a shared, loaded machine.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def block(x: Any) -> Any:
    """Wait for every jax array in a pytree (non-jax leaves, e.g. torch tensors, pass through)."""
    return jax.block_until_ready(x)


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5) -> list[float]:
    """Wall-clock seconds of `repeats` calls of fn() (results blocked on) after `warmup` calls."""
    if repeats <= 0 or warmup < 0:
        raise ValueError(f"time_fn: need repeats > 0 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    return times


def time_interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int = 1,
                     repeats: int = 5) -> dict[str, list[float]]:
    """Like time_fn for several functions, run in alternation (a, b, a, b, ...).

    On a shared machine the load drifts; alternating makes each repeat of every contender see
    about the same load, so their ratio is fairer than timing one after the other.
    """
    if repeats <= 0 or warmup < 0:
        raise ValueError(f"time_interleaved: need repeats > 0 and warmup >= 0, got {repeats}, "
                         f"{warmup}")
    for fn in fns.values():
        for _ in range(warmup):
            block(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            block(fn())
            times[name].append(time.perf_counter() - t0)
    return times


def median(times: Sequence[float]) -> float:
    return statistics.median(times)


def matmul_probe(n: int = 2048, dtype: Any = jnp.float32) -> tuple[Callable[[], Any], float]:
    """(fn, flops): one jitted [n, n] @ [n, n] matmul in `dtype` per call."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: a @ b)
    return (lambda: f(a, b)), 2.0 * n ** 3


def copy_probe(nbytes: int = 256 * 2 ** 20) -> tuple[Callable[[], Any], float]:
    """(fn, bytes): one in-place jitted x + 1 over `nbytes` per call (read + written bytes).

    The buffer is donated so XLA writes in place: no allocation or page faults are timed,
    only the streaming read and write of the array.
    """
    f = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    state = {"x": jnp.zeros((nbytes // 4,), jnp.float32)}

    def run() -> jax.Array:
        state["x"] = f(state["x"])
        return state["x"]

    return run, 2.0 * (nbytes // 4) * 4


def matmul_peak(n: int = 2048, dtype: Any = jnp.float32, repeats: int = 7) -> float:
    """Best-of-`repeats` FLOP/s of a jitted [n, n] @ [n, n] matmul in `dtype`."""
    fn, flops = matmul_probe(n, dtype)
    return flops / min(time_fn(fn, warmup=2, repeats=repeats))


def copy_bandwidth(nbytes: int = 256 * 2 ** 20, repeats: int = 7) -> float:
    """Best-of-`repeats` bytes/s (read + written) of an in-place jitted copy over `nbytes`."""
    fn, nb = copy_probe(nbytes)
    return nb / min(time_fn(fn, warmup=2, repeats=repeats))


def paired_ratio(work: float, times: Sequence[float], ref_work: float,
                 ref_times: Sequence[float]) -> float:
    """Median over repeats of (work / t_i) / (ref_work / ref_t_i) for interleaved timings.

    E.g. MFU = model FLOP/s over the matmul peak measured right next to it, so both numbers
    see the same machine load.
    """
    return statistics.median((work / t) / (ref_work / r) for t, r in zip(times, ref_times))


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: CPU count, load, versions, XLA flags."""
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "jax": jax.__version__,
            "jax_backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if hasattr(os, "getloadavg"):
        info["loadavg_1m_5m_15m"] = list(os.getloadavg())
    return info


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Markdown table of dict rows; floats printed with 3 significant digits."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(columns), sep, *(line(r) for r in cells)])


def write_json(name: str, data: dict[str, Any], results_dir: str = RESULTS_DIR) -> str:
    """Write bench/results/<name>.json (directory created; gitignored) and return its path."""
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
    return path
