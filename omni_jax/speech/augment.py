"""Unit-level perturbation of vocoded speech, for a listener that hears a generator's voice.

A CTC speech generator's greedy units are a reduced copy of its references: onsets dropped,
runs of a repeated unit shortened or stretched (the demo's generator says "two" as 39 39 16 16
16 60 60 60 where the reference is 3 39 59 16 16 16 60 60 60). An ASR trained only on the
references' exact vocodings can turn one frame less into another answer. `perturb_frames` draws
such a reduced copy as indices into the units; `cut_wav` cuts the vocoded wav to it, each unit
its hop of samples (unit_spans), without vocoding again.
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np


@dataclasses.dataclass(frozen=True)
class UnitPerturb:
    """Per run of equal units: removed whole (drop_run), else one unit less when it has more
    than one (shorten), or one more (lengthen). The defaults change durations only: dropped
    runs taught the demo's listener that cut audio is a sentence (configs/recipes/demo.py)."""

    drop_run: float = 0.0
    shorten: float = 0.3
    lengthen: float = 0.2

    def __post_init__(self) -> None:
        for name in ("drop_run", "shorten", "lengthen"):
            p = getattr(self, name)
            if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
                raise ValueError(f"UnitPerturb.{name} must be a probability in [0, 1], got {p!r}")
        if self.drop_run >= 1.0:
            raise ValueError(f"UnitPerturb.drop_run must be < 1 (some runs kept), got "
                             f"{self.drop_run}")
        if self.shorten + self.lengthen > 1.0:
            raise ValueError(f"UnitPerturb: shorten + lengthen must be <= 1, got "
                             f"{self.shorten} + {self.lengthen}")


def _runs(units: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of equal adjacent units."""
    edges = np.flatnonzero(np.diff(units)) + 1
    bounds = np.concatenate([[0], edges, [units.size]])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def perturb_frames(units: np.ndarray, p: UnitPerturb, rng: np.random.Generator) -> np.ndarray:
    """Units [n] -> indices [m] into them (in order, m >= 1): a perturbed copy (class doc).
    At least one run is always kept."""
    units = np.asarray(units)
    if units.ndim != 1 or units.size == 0:
        raise ValueError(f"perturb_frames: expected a non-empty 1-D unit sequence, got shape "
                         f"{units.shape}")
    runs = _runs(units)
    keep = rng.random(len(runs)) >= p.drop_run
    if not keep.any():
        keep[rng.integers(len(runs))] = True
    out: list[int] = []
    for (a, b), k in zip(runs, keep):
        if not k:
            continue
        idx = list(range(a, b))
        r = rng.random()
        if r < p.shorten and len(idx) > 1:
            idx.pop()
        elif p.shorten <= r < p.shorten + p.lengthen:
            idx.append(b - 1)
        out += idx
    return np.asarray(out, np.int64)


def unit_spans(n: int, hop: int) -> tuple[np.ndarray, np.ndarray]:
    """The samples of each of n vocoded units -> (starts [n], ends [n]): unit k is centred on
    sample k * hop as a centred STFT frame is, [k * hop - hop // 2, k * hop + hop // 2),
    clipped to the wav (the first unit is half a hop, the last one and a half)."""
    starts = np.maximum(np.arange(n) * hop - hop // 2, 0)
    return starts, np.append(starts[1:], n * hop)


def cut_wav(wav: np.ndarray, frames: np.ndarray, hop: int, fade: int = 64) -> np.ndarray:
    """A vocoded wav [n_units * hop] -> the wav of `frames` (indices into its units; each
    unit's samples by unit_spans), with a `fade`-sample ramp on both sides of each cut and at
    an end whose unit was dropped. frames = arange(n_units) gives the wav back."""
    wav = np.asarray(wav, np.float32)
    frames = np.asarray(frames)
    if not isinstance(hop, (int, np.integer)) or hop <= 1 or wav.ndim != 1 or wav.size % hop:
        raise ValueError(f"cut_wav: expected a 1-D wav of a whole number of {hop}-sample "
                         f"units (hop >= 2), got shape {wav.shape}")
    if fade < 0:
        raise ValueError(f"cut_wav: fade must be >= 0 samples, got {fade}")
    n = wav.size // hop
    if (frames.ndim != 1 or frames.size == 0 or not np.issubdtype(frames.dtype, np.integer)
            or frames.min() < 0 or frames.max() >= n):
        raise ValueError(f"cut_wav: frames must be a non-empty 1-D int array of indices in "
                         f"[0, {n}), got {frames.tolist()}")
    starts, ends = unit_spans(n, hop)
    segs = [wav[starts[k]:ends[k]].copy() for k in frames]
    fade = min(int(fade), int(np.min(ends - starts)) // 2)
    if fade > 0:
        ramp = (np.arange(fade, dtype=np.float32) + 0.5) / fade  # (0, 1): no sample zeroed
        cut = np.diff(frames) != 1
        out_at = np.append(cut, frames[-1] != n - 1)  # a cut (or a dropped end) after frame j
        in_at = np.insert(cut, 0, frames[0] != 0)  # ... before frame j
        for j, seg in enumerate(segs):
            if out_at[j]:
                seg[-fade:] *= ramp[::-1]
            if in_at[j]:
                seg[:fade] *= ramp
    return np.concatenate(segs)
