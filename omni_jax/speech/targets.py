"""A recipe's speech-out targets: the data.speech.SpeechTargets its records need, if any.

config.speech_units.dir names a saved unit tokenizer (omni_jax.speech.units); records that give
their spoken answer as audio ("speech_audio") are encoded with it, records with "speech_units"
need none.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from omni_jax.data.speech import SpeechTargets


def load_unit_encoder(units_dir: str, sample_rate: int = 16000) -> Any:
    """audio ref (path / bytes) -> units with the saved unit tokenizer in `units_dir`."""
    from omni_jax.data.features import audio as afeat
    from omni_jax.data.features.config import AudioConfig
    from omni_jax.data.sources import read_media
    from omni_jax.speech.units import UnitTokenizer

    tok = UnitTokenizer.load(units_dir)
    audio_cfg = AudioConfig(sampling_rate=sample_rate)

    def encode(ref: Any) -> np.ndarray:
        return tok.encode(afeat.decode_audio(read_media(ref), audio_cfg), sample_rate)

    return encode


def speech_targets(config: Any, omni: Any, template: Any) -> SpeechTargets | None:
    """SpeechTargets for a recipe config whose model has a speech generator, else None."""
    if omni.speech is None:
        return None
    from omni_jax.speech.config import check_compatible

    check_compatible(omni.speech, omni.llm, tokenizer_vocab=template.tokenizer.vocab_size)
    units = config.get("speech_units", {}) or {}
    units_fn = load_unit_encoder(units["dir"]) if units.get("dir") else None
    return SpeechTargets(template, unit_vocab=omni.speech.unit_vocab, units_fn=units_fn,
                         require=False)
