"""Speech-out targets: a record's spoken answer -> generator inputs, and their static batching.

A speech record is an omni record (messages + media) whose assistant answer also has speech:
  "speech_units": [int, ...]      the answer's discrete units (omni_jax.speech.units), or
  "speech_audio": ref             a wav (path / bytes) that the run's unit tokenizer encodes,
and, for preference (DPO) data, the rejected rendering of the same answer as
  "speech_units_rejected" / "speech_audio_rejected" (the chosen one is "speech_units" / "_audio").
`SpeechTargets(example, record)` adds to an encoded example (before shifting):
  speech_rows [seq] int32: 1 on the LLM positions whose last hidden states feed the generator:
    every assistant turn with its template tokens (<|im_start|>assistant\\n ... <|im_end|>\\n),
    as OpenOmni's training framing;
  speech_text_ids [S_b]: the answer's content tokens (no template tokens), the fusion queries;
  speech_units [U_b] (+ speech_units_rejected [U'_b]).
`collate_speech` pads those per-example arrays to the static lengths of DataConfig.speech and
adds their masks; packing is not supported for them (one conversation per row).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

SPEECH_KEYS = ("speech_text_ids", "speech_units", "speech_units_rejected")
SPEECH_LENGTHS = {"speech_text_ids": "text_len", "speech_units": "units_len",
                  "speech_units_rejected": "units_len"}
MASK_KEYS = {"speech_text_ids": "speech_text_mask", "speech_units": "speech_unit_mask",
             "speech_units_rejected": "speech_unit_mask_rejected"}
UnitsFn = Callable[[Any], np.ndarray]  # audio ref -> units [frames]


def check_speech_spec(spec: Mapping[str, Any]) -> dict[str, int]:
    """DataConfig.speech {"text_len": S, "units_len": U} (or {}) -> validated ints."""
    spec = dict(spec or {})
    if not spec:
        return {}
    if sorted(spec) != ["text_len", "units_len"] or any(int(v) <= 0 for v in spec.values()):
        raise ValueError(f"DataConfig.speech must be {{text_len: > 0, units_len: > 0}} (static "
                         f"padded lengths of the answer text and its units), got {spec}")
    return {k: int(v) for k, v in spec.items()}


def _units(record: Mapping[str, Any], suffix: str, units_fn: UnitsFn | None,
           vocab: int | None) -> np.ndarray | None:
    given, audio = record.get("speech_units" + suffix), record.get("speech_audio" + suffix)
    if given is None and audio is None:
        return None
    if given is not None and audio is not None:
        raise ValueError(f"record gives both speech_units{suffix} and speech_audio{suffix}; "
                         f"expected one")
    if given is None:
        if units_fn is None:
            raise ValueError(f"record has speech_audio{suffix} but no unit tokenizer is "
                             f"configured (speech.units_dir)")
        given = units_fn(audio)
    units = np.asarray(given)
    if units.ndim != 1 or units.size == 0 or not np.issubdtype(units.dtype, np.integer):
        raise ValueError(f"speech_units{suffix} must be a non-empty 1-D list of ints, got "
                         f"shape {units.shape} dtype {units.dtype}")
    if vocab is not None and (units.min() < 0 or units.max() >= vocab):
        bad = int(units[(units < 0) | (units >= vocab)][0])
        raise ValueError(f"speech_units{suffix} holds unit {bad} outside the generator's "
                         f"vocabulary [0, {vocab})")
    return units.astype(np.int32)


def turn_rows(loss_mask: np.ndarray, header_len: int) -> np.ndarray:
    """Assistant-turn positions: each run of loss_mask (answer + <|im_end|>), `header_len`
    tokens before it (<|im_start|>assistant\\n) and one after (the turn's closing newline)."""
    mask = np.asarray(loss_mask).astype(bool)
    rows = mask.copy()
    starts = np.nonzero(mask & ~np.concatenate([[False], mask[:-1]]))[0]
    ends = np.nonzero(mask & ~np.concatenate([mask[1:], [False]]))[0]
    for s in starts:
        rows[max(0, s - header_len):s] = True
    for e in ends:
        rows[e + 1:e + 2] = True
    return rows.astype(np.int32)


class SpeechTargets:
    """Adds speech_rows / speech_text_ids / speech_units(_rejected) to an encoded example."""

    def __init__(self, template: Any, *, unit_vocab: int | None = None,
                 units_fn: UnitsFn | None = None, require: bool = True) -> None:
        tok = template.tokenizer
        self.im_end = tok.im_end_id
        self.header_len = len(tok.encode(f"{tok.config.im_start_token}assistant\n"))
        self.unit_vocab, self.units_fn, self.require = unit_vocab, units_fn, require

    def __call__(self, example: dict[str, np.ndarray], record: Mapping[str, Any]
                 ) -> dict[str, np.ndarray]:
        units = _units(record, "", self.units_fn, self.unit_vocab)
        if units is None:
            if self.require:
                raise ValueError(f"record has no speech_units / speech_audio (the spoken "
                                 f"answer); keys: {sorted(record)}")
            return example
        ids, loss = example["input_ids"], example["loss_mask"].astype(bool)
        text = ids[loss & (ids != self.im_end)]
        if text.size == 0:
            raise ValueError("speech record has an empty assistant answer; the generator needs "
                             "the answer's text tokens")
        out = {**example, "speech_rows": turn_rows(loss, self.header_len),
               "speech_text_ids": text.astype(np.int32), "speech_units": units}
        rejected = _units(record, "_rejected", self.units_fn, self.unit_vocab)
        if rejected is not None:
            out["speech_units_rejected"] = rejected
        return out


def collate_speech(examples: Sequence[Mapping[str, np.ndarray]], batch_size: int,
                   spec: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Per-example speech arrays -> [batch, len] int32 arrays + masks (rows past the examples
    are padding); ValueError if an example exceeds the static length or keys disagree."""
    keys = [k for k in SPEECH_KEYS if k in examples[0]] if examples else []
    if not keys:
        return {}
    if not spec:
        raise ValueError(f"examples carry speech targets {keys} but DataConfig.speech is not "
                         f"set; expected {{text_len, units_len}}")
    out: dict[str, np.ndarray] = {}
    for key in keys:
        n = spec[SPEECH_LENGTHS[key]]
        arr = np.zeros((batch_size, n), np.int32)
        mask = np.zeros((batch_size, n), np.int32)
        for r, ex in enumerate(examples):
            if key not in ex:
                raise ValueError(f"examples disagree on speech targets: one lacks {key!r}")
            v = np.asarray(ex[key])
            if v.shape[0] > n:
                raise ValueError(f"{key} of length {v.shape[0]} exceeds DataConfig.speech."
                                 f"{SPEECH_LENGTHS[key]}={n}; raise it (or drop long answers)")
            arr[r, :v.shape[0]], mask[r, :v.shape[0]] = v, 1
        out[key], out[MASK_KEYS[key]] = arr, mask
    return out


def fits(example: Mapping[str, np.ndarray], spec: Mapping[str, int]) -> bool:
    """Whether the example's speech arrays fit the static lengths (else it is dropped)."""
    return all(np.shape(example[k])[0] <= spec[SPEECH_LENGTHS[k]]
               for k in SPEECH_KEYS if k in example and spec)
