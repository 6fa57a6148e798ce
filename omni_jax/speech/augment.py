"""Unit-level perturbation of vocoded speech, for a listener that hears a generator's voice.

A CTC speech generator's greedy units are a reduced copy of its references: onsets dropped,
runs of a repeated unit shortened or stretched (the demo's generator says "two" as 39 39 16 16
16 60 60 60 where the reference is 3 39 59 16 16 16 60 60 60). An ASR trained only on the
references' exact vocodings can turn one frame less into another answer. `perturb_frames` draws
such a reduced copy as indices into the units; `cut_wav` cuts the vocoded wav to it, one hop of
samples per unit, without vocoding again.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class UnitPerturb:
    """Per run of equal units: removed whole (drop_run), else one unit less when it has more
    than one (shorten), or one more (lengthen)."""

    drop_run: float = 0.3
    shorten: float = 0.3
    lengthen: float = 0.1

    def __post_init__(self) -> None:
        for name in ("drop_run", "shorten", "lengthen"):
            p = getattr(self, name)
            if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
                raise ValueError(f"UnitPerturb.{name} must be a probability in [0, 1), got {p!r}")
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


def cut_wav(wav: np.ndarray, frames: np.ndarray, hop: int, fade: int = 64) -> np.ndarray:
    """A vocoded wav [n_units * hop] -> the wav of `frames` (indices into its units): one hop of
    samples per frame, a `fade`-sample ramp on both sides of each cut."""
    wav = np.asarray(wav, np.float32)
    frames = np.asarray(frames, np.int64)
    if hop <= 0 or wav.ndim != 1 or wav.size % hop:
        raise ValueError(f"cut_wav: expected a 1-D wav of a whole number of {hop}-sample "
                         f"units, got shape {wav.shape}")
    n = wav.size // hop
    if frames.ndim != 1 or frames.size == 0 or frames.min() < 0 or frames.max() >= n:
        raise ValueError(f"cut_wav: frames must be a non-empty 1-D array of indices in "
                         f"[0, {n}), got {frames.tolist()}")
    seg = wav.reshape(n, hop)[frames].copy()  # [m, hop]
    fade = min(int(fade), hop // 2)
    if fade > 0:
        ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
        cuts = np.flatnonzero(np.diff(frames) != 1)  # a cut between frame k and k + 1
        seg[cuts, hop - fade:] *= ramp[::-1]
        seg[cuts + 1, :fade] *= ramp
    return seg.reshape(-1)
