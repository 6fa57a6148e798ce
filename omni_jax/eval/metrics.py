"""Evaluation metrics: answer normalisation, exact-match accuracy, word error rate, and the
pitch and speaking-rate rules of the expressive-style measure. NumPy / librosa: no model, no JAX.

- `normalize_answer`: lowercase, punctuation removed, the articles a / an / the dropped,
  whitespace collapsed (SQuAD-style); exact match compares normalised strings.
- `normalize_words`: lowercase, punctuation removed, split on whitespace (WER keeps articles).
- Word error rate: word-level Levenshtein distance (substitutions, insertions, deletions, each
  cost 1); corpus WER = total edits / total reference words (not a mean of per-item WERs).
- Expressive style (`calibrate_style`, `StyleRule`): one cue of an utterance past a threshold
  = expressive. Cues: pitch (`mean_f0`: librosa.pyin, voiced frames only; higher =
  expressive) and speaking rate (`seconds_per_letter`: trimmed duration over the text's
  letters; lower = expressive). The threshold is calibrated on reference renderings of known
  style: the midpoint between the two classes' mean values. An utterance with no voiced frame
  has no pitch (0 Hz in the calibration means); a silent one no rate (left out); neither is
  ever expressive.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Sequence

import numpy as np

ARTICLES = ("a", "an", "the")
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLE = re.compile(r"\b(?:" + "|".join(ARTICLES) + r")\b")
F0_RANGE = (60.0, 500.0)  # pyin search range in Hz (speech fundamental frequencies)
TRIM_DB = 40.0  # speaking rate: silence = this many dB below the utterance's peak
TRIM_FRAME = 0.025  # seconds per energy frame of the trim (hop: a quarter of it)


def _check_text(name: str, text: object) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{name}: expected a string, got {type(text).__name__}")
    return text


def normalize_words(text: str) -> list[str]:
    """Lowercase, punctuation replaced by spaces -> the words (WER's tokens)."""
    return _PUNCT.sub(" ", _check_text("normalize_words", text).lower()).split()


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation and articles (a, an, the) removed, whitespace collapsed."""
    words = _PUNCT.sub(" ", _check_text("normalize_answer", text).lower())
    return " ".join(_ARTICLE.sub(" ", words).split())


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the normalised prediction equals the normalised reference."""
    return normalize_answer(prediction) == normalize_answer(reference)


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | int]:
    """Exact-match accuracy -> {"accuracy", "correct", "count"} (accuracy 0.0 when empty)."""
    if len(predictions) != len(references):
        raise ValueError(f"accuracy: {len(predictions)} predictions for {len(references)} "
                         f"references; expected one per reference")
    correct = sum(exact_match(p, r) for p, r in zip(predictions, references))
    n = len(references)
    return {"accuracy": correct / n if n else 0.0, "correct": int(correct), "count": n}


def prior_baseline(questions: Sequence[str], references: Sequence[str]
                   ) -> dict[str, float | int]:
    """The chance level of a QA set: the exact-match accuracy of a media-blind answerer that
    gives, for each distinct question, its most frequent reference in this very set (an upper
    bound on what the question alone buys) -> {"accuracy", "correct", "count"}."""
    if len(questions) != len(references):
        raise ValueError(f"prior_baseline: {len(questions)} questions for {len(references)} "
                         f"references; expected one per reference")
    by_q: dict[str, dict[str, int]] = {}
    for q, r in zip(questions, references):
        counts, answer = by_q.setdefault(normalize_answer(q), {}), normalize_answer(r)
        counts[answer] = counts.get(answer, 0) + 1
    correct = sum(max(c.values()) for c in by_q.values())
    n = len(references)
    return {"accuracy": correct / n if n else 0.0, "correct": int(correct), "count": n}


def word_edits(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Word-level Levenshtein distance (substitution, insertion, deletion: cost 1 each)."""
    ref, hyp = list(reference), list(hypothesis)
    prev = list(range(len(hyp) + 1))  # distances of ref[:0] to every hyp prefix
    for i, r in enumerate(ref, start=1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, start=1):
            cur[j] = min(prev[j] + 1,  # delete r
                         cur[j - 1] + 1,  # insert h
                         prev[j - 1] + (r != h))  # substitute (or match)
        prev = cur
    return prev[-1]


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]
                    ) -> dict[str, float | int]:
    """Corpus WER over normalised words -> {"wer", "edits", "ref_words", "count"}.
    wer = total edits / total reference words (inf if the references have no words but the
    hypotheses do, 0.0 if neither has any)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"word_error_rate: {len(hypotheses)} hypotheses for {len(references)} "
                         f"references; expected one per reference")
    edits = words = 0
    for r, h in zip(references, hypotheses):
        rw, hw = normalize_words(r), normalize_words(h)
        edits += word_edits(rw, hw)
        words += len(rw)
    wer = edits / words if words else (float("inf") if edits else 0.0)
    return {"wer": wer, "edits": int(edits), "ref_words": int(words), "count": len(references)}


# ---- expressive style: pitch and speaking-rate rules -----------------------------------------
def mean_f0(wav: np.ndarray, sample_rate: int, *, fmin: float = F0_RANGE[0],
            fmax: float = F0_RANGE[1]) -> float:
    """Mean F0 in Hz over the voiced frames of librosa.pyin (nan when none is voiced)."""
    import librosa

    x = _check_wav("mean_f0", wav, sample_rate)
    if not 0 < fmin < fmax < sample_rate / 2:
        raise ValueError(f"mean_f0: need 0 < fmin < fmax < sample_rate / 2, got {fmin}, {fmax}")
    frame = 2048 if sample_rate >= 16000 else 1024
    if x.size < frame or not np.isfinite(x).all() or not np.any(x):
        return float("nan")  # too short, broken or silent: no pitch
    f0, voiced, _ = librosa.pyin(x, fmin=fmin, fmax=fmax, sr=int(sample_rate),
                                 frame_length=frame)
    f0 = f0[voiced & np.isfinite(f0)]
    return float(f0.mean()) if f0.size else float("nan")


def seconds_per_letter(wav: np.ndarray, sample_rate: int, text: str, *,
                       top_db: float = TRIM_DB) -> float:
    """Speaking rate: the utterance's duration without leading / trailing silence (librosa's
    trim, `top_db` below the peak, TRIM_FRAME frames) over the letters and digits of its text
    (nan when the audio is silent or the text has none)."""
    import librosa

    x = _check_wav("seconds_per_letter", wav, sample_rate)
    letters = sum(ch.isalnum() for ch in _check_text("seconds_per_letter", text))
    if not letters or not x.size or not np.isfinite(x).all() or not np.any(x):
        return float("nan")
    frame = max(16, int(TRIM_FRAME * sample_rate))
    _, (a, b) = librosa.effects.trim(x, top_db=top_db, frame_length=frame,
                                     hop_length=max(1, frame // 4))
    return float((b - a) / sample_rate / letters) if b > a else float("nan")


def _check_wav(who: str, wav: np.ndarray, sample_rate: int) -> np.ndarray:
    x = np.asarray(wav, np.float32)
    if x.ndim != 1:
        raise ValueError(f"{who}: expected a mono waveform [samples], got shape {x.shape}")
    if not isinstance(sample_rate, int | np.integer) or sample_rate <= 0:
        raise ValueError(f"{who}: sample_rate must be a positive int, got {sample_rate!r}")
    return x


# cue -> (+1: a higher value is expressive, -1: a lower one; what an unmeasurable (nan)
# reference counts as in its class mean, None: left out)
STYLE_CUES = {"pitch": (1, 0.0),  # mean F0 (Hz): unvoiced = 0 Hz (vocoded speech can lose it)
              "rate": (-1, None)}  # seconds per letter: expressive speech is faster


@dataclasses.dataclass(frozen=True)
class StyleRule:
    """Expressive iff the cue's value is past `threshold` (midpoint of the two reference class
    means) on the expressive side, but not past the farthest measured expressive reference
    (near-empty speech is "fast" but not expressive); nan is never expressive."""

    cue: str
    threshold: float
    neutral_mean: float
    expressive_mean: float
    neutral_count: int
    expressive_count: int
    expressive_limit: float  # the farthest measurable expressive reference from the threshold

    def is_expressive(self, value: float) -> bool:
        sign = STYLE_CUES[self.cue][0]
        return bool(np.isfinite(value) and sign * (value - self.threshold) > 0
                    and sign * (self.expressive_limit - value) >= 0)

    def to_dict(self) -> dict[str, float | int | str]:
        return dataclasses.asdict(self)


def calibrate_style(cue: str, neutral: Sequence[float], expressive: Sequence[float]
                    ) -> StyleRule:
    """The rule of `cue` from reference values of known style (STYLE_CUES says how nan counts).
    ValueError if a class is empty (after that), no expressive reference is measurable, or
    the classes are not apart in the cue's direction."""
    if cue not in STYLE_CUES:
        raise ValueError(f"calibrate_style: unknown cue {cue!r}; expected one of "
                         f"{sorted(STYLE_CUES)}")
    sign, fill = STYLE_CUES[cue]
    n, e = (np.asarray(v, np.float64) for v in (neutral, expressive))
    if not np.isfinite(e).any():
        raise ValueError(f"calibrate_style({cue}): none of the {e.size} expressive references "
                         f"is measurable; the rule cannot be calibrated")
    n, e = ((np.nan_to_num(v, nan=fill) if fill is not None else v[np.isfinite(v)])
            for v in (n, e))
    if not n.size or not e.size:
        raise ValueError(f"calibrate_style({cue}): need neutral and expressive references, "
                         f"got {n.size} and {e.size}")
    limit = float(e.max() if sign > 0 else e.min())
    if not sign * (e.mean() - n.mean()) > 0:
        side = "higher" if sign > 0 else "lower"
        raise ValueError(f"calibrate_style({cue}): expressive references ({e.mean():.4g}) are "
                         f"not {side} than neutral ones ({n.mean():.4g}); the rule cannot "
                         f"separate them")
    return StyleRule(cue, float((n.mean() + e.mean()) / 2), float(n.mean()), float(e.mean()),
                     int(n.size), int(e.size), limit)
