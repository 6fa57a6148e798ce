"""Evaluation metrics: answer normalisation, exact-match accuracy, word error rate, and the pitch
rule of the expressive-style measure. Pure NumPy / librosa: no model, no JAX.

- `normalize_answer`: lowercase, punctuation removed, the articles a / an / the dropped,
  whitespace collapsed (SQuAD-style); exact match compares normalised strings.
- `normalize_words`: lowercase, punctuation removed, split on whitespace (WER keeps articles).
- Word error rate: word-level Levenshtein distance (substitutions, insertions, deletions, each
  cost 1); corpus WER = total edits / total reference words (not a mean of per-item WERs).
- Expressive style (`mean_f0`, `calibrate_pitch`, `is_expressive`): the mean fundamental
  frequency of an utterance (librosa.pyin, voiced frames only) above a threshold = expressive.
  The threshold is calibrated on reference renderings of known style: the midpoint between the
  mean of the neutral references' mean F0 and the mean of the expressive references' mean F0.
  An utterance with no voiced frame (F0 undefined) has no pitch: 0 Hz in the calibration means,
  and never expressive.
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


# ---- expressive style: the pitch rule ---------------------------------------------------------
def mean_f0(wav: np.ndarray, sample_rate: int, *, fmin: float = F0_RANGE[0],
            fmax: float = F0_RANGE[1]) -> float:
    """Mean F0 in Hz over the voiced frames of librosa.pyin (nan when none is voiced)."""
    import librosa

    x = np.asarray(wav, np.float32)
    if x.ndim != 1:
        raise ValueError(f"mean_f0: expected a mono waveform [samples], got shape {x.shape}")
    if not isinstance(sample_rate, int | np.integer) or sample_rate <= 0:
        raise ValueError(f"mean_f0: sample_rate must be a positive int, got {sample_rate!r}")
    if not 0 < fmin < fmax < sample_rate / 2:
        raise ValueError(f"mean_f0: need 0 < fmin < fmax < sample_rate / 2, got {fmin}, {fmax}")
    frame = 2048 if sample_rate >= 16000 else 1024
    if x.size < frame or not np.isfinite(x).all() or not np.any(x):
        return float("nan")  # too short, broken or silent: no pitch
    f0, voiced, _ = librosa.pyin(x, fmin=fmin, fmax=fmax, sr=int(sample_rate),
                                 frame_length=frame)
    f0 = f0[voiced & np.isfinite(f0)]
    return float(f0.mean()) if f0.size else float("nan")


@dataclasses.dataclass(frozen=True)
class PitchRule:
    """Expressive iff mean F0 > threshold (midpoint of the two reference class means)."""

    threshold: float
    neutral_f0: float  # mean over the neutral references' mean F0
    expressive_f0: float
    neutral_count: int
    expressive_count: int

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def calibrate_pitch(neutral: Sequence[float], expressive: Sequence[float]) -> PitchRule:
    """The threshold from reference mean F0s of known style. An unvoiced reference (nan) has no
    pitch and counts as 0 Hz in its class mean (vocoded low-pitched speech can lose its
    voicing). ValueError if a class is empty, no expressive reference is voiced, or the
    expressive class is not higher-pitched than the neutral one."""
    if not len(neutral) or not len(expressive):
        raise ValueError(f"calibrate_pitch: need neutral and expressive references, got "
                         f"{len(neutral)} and {len(expressive)}")
    n = np.nan_to_num(np.asarray(neutral, np.float64), nan=0.0)
    e = np.nan_to_num(np.asarray(expressive, np.float64), nan=0.0)
    if not np.any(e > 0):
        raise ValueError(f"calibrate_pitch: none of the {e.size} expressive references is "
                         f"voiced; the pitch rule cannot be calibrated")
    if not e.mean() > n.mean():
        raise ValueError(f"calibrate_pitch: expressive references ({e.mean():.1f} Hz) are not "
                         f"higher-pitched than neutral ones ({n.mean():.1f} Hz); the pitch "
                         f"rule cannot separate them")
    return PitchRule(float((n.mean() + e.mean()) / 2), float(n.mean()), float(e.mean()),
                     int(n.size), int(e.size))


def is_expressive(f0: float, rule: PitchRule) -> bool:
    """The rule on one utterance's mean F0 (nan: not expressive)."""
    return bool(np.isfinite(f0) and f0 > rule.threshold)
