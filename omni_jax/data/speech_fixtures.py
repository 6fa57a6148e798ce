"""Offline speech-out fixtures: spoken answers with their units, and DPO style pairs.

`make_speech_fixtures(out_dir, manifests)` renders the answers of the image-QA fixture records
with espeak-ng (tones when it is missing), fits a unit tokenizer (omni_jax.speech.units) and its
mel-table vocoder on those renderings (saved in out_dir/units), and writes
  speech_response.jsonl  the image-QA records + "speech_units" of the neutral rendering
  speech_dpo.jsonl       the same + chosen = an expressive rendering (higher pitch, faster),
                         "speech_units_rejected" = the neutral one
so the OpenOmni recipe's speech stages (IV CTC, V DPO) run on the fixture set.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

# espeak-ng prosody of the two styles: (pitch 0-99, words per minute)
STYLES = {"neutral": (40, 150), "expressive": (85, 210)}


def render(text: str, style: str, voice: str = "en-us", sample_rate: int = 16000
           ) -> tuple[np.ndarray, str]:
    """text -> (16 kHz waveform, source): espeak-ng in the style, else a tone per word."""
    pitch, speed = STYLES[style]
    exe = shutil.which("espeak-ng")
    if exe is not None:
        from omni_jax.data.features import audio as afeat
        from omni_jax.data.features.config import AudioConfig

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "out.wav")
            res = subprocess.run([exe, "-v", voice, "-p", str(pitch), "-s", str(speed), "-w",
                                  path, text], capture_output=True, timeout=30, check=False)
            if res.returncode == 0 and os.path.isfile(path):
                with open(path, "rb") as f:
                    wav = afeat.decode_audio(f.read(), AudioConfig(sampling_rate=sample_rate))
                return wav, f"espeak-ng:{voice}:{style}"
    words = text.split()
    seconds = 0.25 * 150 / speed
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    tones = [0.3 * np.sin(2 * np.pi * (200 + 4 * pitch + 37 * (sum(map(ord, w)) % 11)) * t)
             for w in words]
    return np.concatenate(tones).astype(np.float32), f"tone:{style}"


def make_speech_fixtures(out_dir: str | os.PathLike, manifests: Mapping[str, str], *,
                         unit_vocab: int = 40, frame_rate: int = 25, seed: int = 0
                         ) -> dict[str, str]:
    """Write speech_response / speech_dpo manifests and the units dir; -> {name: path}
    (manifests must hold "image_qa", as make_fixtures writes it)."""
    from omni_jax.speech.units import UnitConfig, UnitTokenizer
    from omni_jax.speech.vocoder import MelTableVocoder

    if "image_qa" not in manifests:
        raise ValueError(f"make_speech_fixtures: needs the image_qa manifest, got "
                         f"{sorted(manifests)}")
    out = os.fspath(out_dir)
    with open(manifests["image_qa"]) as f:
        records = [json.loads(line) for line in f]
    answers = sorted({r["messages"][-1]["content"] for r in records})
    waves = {(a, s): render(a, s) for a in answers for s in STYLES}
    config = UnitConfig(vocab_size=unit_vocab, frame_rate=frame_rate, seed=seed)
    tok = UnitTokenizer.fit([w for w, _ in waves.values()], config)
    units_dir = os.path.join(out, "units")
    tok.save(units_dir)
    MelTableVocoder.fit(tok, [w for w, _ in waves.values()]).save(units_dir)
    units = {k: tok.encode(w, config.sample_rate).tolist() for k, (w, _) in waves.items()}
    response, dpo = [], []
    for r in records:
        a = r["messages"][-1]["content"]
        base: dict[str, Any] = {k: v for k, v in r.items() if k != "id"}
        response.append({"id": f"sp_{r['id']}", **base, "speech_units": units[(a, "neutral")],
                         "speech_source": waves[(a, "neutral")][1]})
        dpo.append({"id": f"dpo_{r['id']}", **base, "speech_units": units[(a, "expressive")],
                    "speech_units_rejected": units[(a, "neutral")],
                    "speech_source": waves[(a, "expressive")][1]})
    paths = {}
    for name, recs in (("speech_response", response), ("speech_dpo", dpo)):
        paths[name] = os.path.join(out, f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in recs)
    paths["units_dir"] = units_dir
    return paths
