"""Expressive-style accuracy of generated speech (the speech_dpo records' prompts).

The generated speech is classified by a rule of eval.metrics (pitch, or speaking rate), each
calibrated on the vocoded chosen (expressive) and rejected (neutral) reference units of the
first CALIBRATION records; the cue whose rule tells those references apart best judges (a unit
vocoder may keep the rate of the speech but not its pitch); accuracy = share classified
expressive. The calibration is kept per process for a vocoder with a `fingerprint`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from omni_jax.eval import metrics as M
from omni_jax.eval.tasks import Item, _prepare_all, reference_text

CALIBRATION = 32  # reference pairs (the first ones) that calibrate the style rules


def _cue_value(cue: str, wav: np.ndarray, rate: int, text: str) -> float:
    if cue == "pitch":
        return M.mean_f0(wav, rate)
    return M.seconds_per_letter(wav, rate, text)


_CALIBRATED: dict[tuple, tuple[dict, dict]] = {}  # (vocoder, references) -> (cues, rules)
CACHED_CALIBRATIONS = 8


def calibrate_cues(ev: Any, refs: Sequence[Item]) -> tuple[dict[str, dict], dict[str, Any]]:
    """Every style cue's rule calibrated on the vocoded reference pairs -> ({cue: its rule and
    reference accuracy, or its error}, {cue: StyleRule}). Kept per process for a vocoder with a
    `fingerprint` (the same references of a manifest are voiced and measured once, not once
    per evaluated stage)."""
    rate = ev.sample_rate
    texts = [reference_text(it.record) for it in refs]
    fingerprint = getattr(ev.vocoder, "fingerprint", None)
    key = None if fingerprint is None else (fingerprint, rate, tuple(
        (tuple(it.record["speech_units"]), tuple(it.record["speech_units_rejected"]), t)
        for it, t in zip(refs, texts)))
    if key is not None and key in _CALIBRATED:
        return _CALIBRATED[key]
    wavs = {side: ev.vocode_many([it.record[k] for it in refs]) for side, k in
            (("neutral", "speech_units_rejected"), ("expressive", "speech_units"))}
    cues: dict[str, dict[str, Any]] = {}
    rules: dict[str, M.StyleRule] = {}
    for cue in M.STYLE_CUES:
        vals = {side: [_cue_value(cue, w, rate, t) for w, t in zip(ws, texts)]
                for side, ws in wavs.items()}
        try:
            rule = M.calibrate_style(cue, vals["neutral"], vals["expressive"])
        except ValueError as e:
            cues[cue] = {"error": str(e)}
            continue
        sep = [rule.is_expressive(v) for v in vals["expressive"]] + [
            not rule.is_expressive(v) for v in vals["neutral"]]
        rules[cue] = rule
        cues[cue] = {"rule": rule.to_dict(), "reference_accuracy": float(np.mean(sep))}
    if key is not None:
        while len(_CALIBRATED) >= CACHED_CALIBRATIONS:
            _CALIBRATED.pop(next(iter(_CALIBRATED)))
        _CALIBRATED[key] = (cues, rules)
    return cues, rules


def eval_style(ev: Any, task: str, items: Sequence[Item], skipped: list[dict[str, Any]]
               ) -> dict:
    """Style accuracy of the generated speech (module doc): every cue's rule calibrated on the
    vocoded references, the one that tells them apart best judges; {} without a vocoder."""
    if ev.speech_problem(vocoder=True) is not None:
        return {}
    rate, refs = ev.sample_rate, items[:CALIBRATION]
    cues, rules = calibrate_cues(ev, refs)
    if not rules:
        return {"task": task, "value": None, "count": 0, "cues": cues,
                "error": "; ".join(c["error"] for c in cues.values())}
    cue = max(rules, key=lambda c: cues[c]["reference_accuracy"])  # first of equals
    rule = rules[cue]
    prepared = _prepare_all(ev, items, [])  # (their media decoded fine for the DPO pairs)
    answers = ev.answers(prepared) if prepared else []
    spoken = ev.speak_many(prepared, answers)
    values = [_cue_value(cue, wav, rate, a) for (_, wav), a in zip(spoken, answers)]
    hits = sum(rule.is_expressive(v) for v in values)
    return {"task": task, "value": hits / len(values) if values else None,
            "correct": int(hits), "count": len(values), "cue": cue, "rule": cues[cue]["rule"],
            "reference_accuracy": cues[cue]["reference_accuracy"], "cues": cues,
            "values": [None if not np.isfinite(v) else round(float(v), 5) for v in values]}
