"""Voice many unit sequences at once, on several cores.

MelTableVocoder's synthesis (librosa's NNLS and Griffin-Lim) holds the GIL, so threads do not
speed it up; `vocode_many` maps it over a pool of spawned worker processes instead (kept for
the next call with the same vocoder). Every clip is voiced with single-threaded BLAS, in a
worker or (small lists) here: OpenBLAS splits the NNLS matrix products differently per thread
count, so the audio would otherwise depend on the machine's cores; this way a clip's samples
are the same bits whatever the pool size or order (Griffin-Lim's phase comes from the
vocoder's fixed seed). Multi-threaded BLAS was no faster on these small products: 120 clips
took 12.9 s one by one either way on 2 cores, 5.8 s in a warm pool of 2. Any picklable
`Vocoder` works. Spawned workers re-import the main module, so the pool is used only where
that is harmless (`spawn_safe`: a `python -m` entry point such as the CLIs, or an interactive
session); elsewhere, or if the pool breaks, the clips are voiced here, to the same bits.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import multiprocessing
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

__all__ = ["default_workers", "spawn_safe", "vocode_many", "voice"]

# fewer clips than this per worker are voiced here: a pool's start-up (a process importing
# librosa) costs about as much as ~20 clips
MIN_PER_WORKER = 16
_POOL: dict[str, Any] = {"key": None, "executor": None}
_VOCODER: Any = None  # the worker process's vocoder (set by _install)


def default_workers() -> int:
    """Cores this process may use (its CPU affinity where the OS reports one), at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def spawn_safe() -> bool:
    """Whether worker processes may be spawned: spawn re-imports __main__; a module run with
    `python -m` (its work under `if __name__ == "__main__"`) or an interactive session without
    a main file is safe, a script file (perhaps unguarded) or stdin is not."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name not in (None, "__main__"):
        return True
    return not getattr(main, "__file__", None)


def _install(vocoder: Any) -> None:
    global _VOCODER
    _VOCODER = vocoder
    threadpool_limits(1)  # this worker process's BLAS, for good


def _voice(units: np.ndarray) -> np.ndarray:
    return voice(_VOCODER, units)


def voice(vocoder: Any, units: np.ndarray) -> np.ndarray:
    """One clip: float32 audio of the units; none for no units (vocoders reject them)."""
    if np.size(units) == 0:
        return np.zeros((0,), np.float32)
    return np.asarray(vocoder(units), np.float32)


def _shutdown() -> None:
    if _POOL["executor"] is not None:
        _POOL["executor"].shutdown(wait=True, cancel_futures=True)
        _POOL.update(key=None, executor=None)


atexit.register(_shutdown)


def _executor(vocoder: Any, workers: int) -> concurrent.futures.ProcessPoolExecutor:
    # a pool voices with the vocoder it was started with: kept for the same fingerprint, or
    # without one the same object (held here, so its id cannot pass to another vocoder)
    fingerprint = getattr(vocoder, "fingerprint", None)
    held = _POOL["key"]
    if held is None or held[1] != workers or (
            held[0] != fingerprint if fingerprint else held[0] is not vocoder):
        _shutdown()
        key = (fingerprint or vocoder, workers)
        ctx = multiprocessing.get_context("spawn")  # not fork: this process runs XLA threads
        _POOL.update(key=key, executor=concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_install, initargs=(vocoder,)))
    return _POOL["executor"]


def vocode_many(vocoder: Any, units: Sequence[Any], workers: int | None = None
                ) -> list[np.ndarray]:
    """[units [frames] int] -> [float32 waveform], in order; empty units -> empty audio.
    workers: processes (default: default_workers()); 1 voices them here."""
    items = [np.asarray(u, np.int32).reshape(-1) for u in units]
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"vocode_many: workers must be >= 1, got {workers}")
    workers = min(workers, len(items) // MIN_PER_WORKER)
    if workers > 1 and spawn_safe():
        chunk = max(1, len(items) // (4 * workers))
        try:
            return list(_executor(vocoder, workers).map(_voice, items, chunksize=chunk))
        except concurrent.futures.process.BrokenProcessPool as e:
            logging.getLogger(__name__).warning("vocode_many: the worker pool broke (%s); "
                                                "voicing the clips in this process", e)
            _shutdown()
    with threadpool_limits(1):
        return [voice(vocoder, u) for u in items]
