"""Training metrics: throughput, MFU, TensorBoard event files and a console progress bar."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np


def measure_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """Measured matmul FLOP/s of one local device (fp32 n x n x n), a stand-in for the peak."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(repeats):
        f(a).block_until_ready()
    return 2.0 * n**3 * repeats / (time.perf_counter() - t)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_total: float) -> float:
    """Model FLOPs utilization: training FLOPs (3x forward) per second / peak of all devices."""
    return tokens_per_s * 3.0 * flops_per_token / max(peak_flops_total, 1e-9)


class MetricsLogger:
    """Scalars -> TensorBoard (process 0) + tqdm bar; adds tokens/s and MFU between log calls."""

    def __init__(self, logdir: str | None, total_steps: int, start_step: int,
                 flops_per_token: float, peak_flops_total: float, progress_bar: bool = True,
                 ) -> None:
        self.main = jax.process_index() == 0
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_total
        self.writer = None
        if logdir and self.main:
            from tensorboardX import SummaryWriter
            os.makedirs(logdir, exist_ok=True)
            self.writer = SummaryWriter(logdir)
        self.bar = None
        if progress_bar and self.main:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True)
        self._t, self._tokens = time.perf_counter(), 0
        self.history: list[tuple[int, dict[str, float]]] = []

    def restart(self) -> None:
        """Reset the throughput window (e.g. after the compiling first step)."""
        self._t, self._tokens = time.perf_counter(), 0
        if self.bar is not None:
            self.bar.update(1)

    def count(self, tokens: int) -> None:
        """Tokens processed by a step (all processes); call once per step."""
        self._tokens += tokens
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, metrics: Mapping[str, jax.Array | float],
            prefix: str = "train") -> dict[str, float]:
        """Fetch metrics to host, add throughput (train only), write; returns the floats."""
        out = {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}
        if prefix == "train":
            now = time.perf_counter()
            tps = self._tokens / max(now - self._t, 1e-9)
            self._t, self._tokens = now, 0
            out["tokens_per_s"] = tps
            out["mfu"] = mfu(tps, self.flops_per_token, self.peak)
        self.history.append((step, {f"{prefix}/{k}": v for k, v in out.items()}))
        if self.writer is not None:
            for k, v in out.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
            self.writer.flush()
        if self.bar is not None and prefix == "train":
            self.bar.set_postfix(loss=f"{out.get('loss/total', float('nan')):.4f}",
                                 tok_s=f"{out['tokens_per_s']:.0f}", mfu=f"{out['mfu']:.3f}")
        return out

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
