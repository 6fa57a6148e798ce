"""Small offline JSONL + media fixture set for tests and the demo (no network, deterministic).

`make_fixtures(out_dir, seed)` writes one JSONL manifest per task, with media under relative
paths next to them:
  image_caption.jsonl  digit images (scikit-learn's bundled 8x8 digits, upscaled PNG)
  image_qa.jsonl       question/answer about a digit image
  video_qa.jsonl       a "video" = a list of digit frames (PNG paths); count/read the digits
  speech_asr.jsonl     spoken digit phrases: espeak-ng WAVs when the binary is installed
                       (several voices), else synthesized tones; "audio_source" says which
  text_chat.jsonl      text-only arithmetic / instruction chat
Records are ChatML conversations ({"messages": [...], media keys ...}) in the parts format of
`omni_jax.data.template` ({"type": "image"} parts mark where each media item goes).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tempfile
import wave
from typing import Any

import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOICES = ("en-us", "en-gb", "en+f3", "en-gb-scotland")
CAPTIONS = ("A handwritten digit {w}.", "The image shows the number {d}.",
            "A small grayscale picture of a {w}.", "The digit {d}, written by hand.")
QUESTIONS = ("What digit is shown?", "Which number is in the picture?",
             "Read the digit in this image.")
ASR_PROMPTS = ("Transcribe the audio.", "What is said in this clip?")
TONE_RATE = 16_000


def _png(pixels: np.ndarray, scale: int) -> bytes:
    from PIL import Image

    img = (pixels / 16.0 * 255.0).clip(0, 255).astype(np.uint8)  # digits are 0..16
    img = np.kron(img, np.ones((scale, scale), np.uint8))  # nearest upscaling [8s, 8s]
    buf = io.BytesIO()
    Image.fromarray(255 - img, mode="L").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _tone_wav(digit: int, seconds: float, rate: int = TONE_RATE) -> bytes:
    """Fallback audio: two sine tones whose pitches encode the digit, 16-bit mono."""
    t = np.arange(int(seconds * rate)) / rate
    sig = 0.3 * np.sin(2 * np.pi * (300 + 60 * digit) * t) + 0.2 * np.sin(2 * np.pi * 990 * t)
    env = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.02)  # 20 ms fade in/out
    pcm = (sig * env * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def _espeak_wav(text: str, voice: str) -> bytes | None:
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.wav")
        res = subprocess.run([exe, "-v", voice, "-w", path, text], capture_output=True,
                             timeout=30, check=False)
        if res.returncode != 0 or not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            return f.read()


def _turns(user: list[dict[str, Any]], answer: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def make_fixtures(out_dir: str | os.PathLike, seed: int = 0, num_images: int = 24,
                  num_audio: int = 8, num_videos: int = 4, num_text: int = 24,
                  image_scale: int = 8, use_espeak: bool = True) -> dict[str, str]:
    """Write the fixture set into out_dir; returns {task name: manifest path}.

    Deterministic for a given seed (and espeak-ng version); ~0.5 MB with the defaults.
    use_espeak=False forces the tone fallback.
    """
    if min(num_images, num_audio, num_videos, num_text) < 1 or image_scale < 1:
        raise ValueError("make_fixtures: counts and image_scale must be >= 1")
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    rng = np.random.default_rng(seed)
    out = os.fspath(out_dir)
    for sub in ("images", "audio"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    digits = load_digits()
    pick = rng.choice(len(digits.images), size=num_images + 4 * num_videos, replace=False)

    def image(k: int) -> tuple[str, int]:
        idx = int(pick[k])
        rel = f"images/digit_{idx:04d}.png"
        with open(os.path.join(out, rel), "wb") as f:
            f.write(_png(digits.images[idx], image_scale))
        return rel, int(digits.target[idx])

    tasks: dict[str, list[dict[str, Any]]] = {k: [] for k in (
        "image_caption", "image_qa", "video_qa", "speech_asr", "text_chat")}
    for k in range(num_images):
        rel, d = image(k)
        cap = CAPTIONS[rng.integers(len(CAPTIONS))].format(w=DIGIT_WORDS[d], d=d)
        tasks["image_caption"].append({"id": f"cap{k}", "images": [rel], "messages": _turns(
            [{"type": "image"}, {"type": "text", "text": "Describe the image."}], cap)})
        q = QUESTIONS[rng.integers(len(QUESTIONS))]
        tasks["image_qa"].append({"id": f"qa{k}", "images": [rel], "messages": _turns(
            [{"type": "image"}, {"type": "text", "text": q}], f"It is a {DIGIT_WORDS[d]}.")})
    for v in range(num_videos):
        frames = [image(num_images + 4 * v + j) for j in range(4)]
        seq = " ".join(str(d) for _, d in frames)
        tasks["video_qa"].append({"id": f"vid{v}", "videos": [[p for p, _ in frames]],
                                  "messages": _turns([{"type": "video"}, {
                                      "type": "text", "text": "Which digits appear, in order?"}],
                                      f"The digits are {seq}.")})
    for a in range(num_audio):
        d1, d2 = (int(x) for x in rng.integers(10, size=2))
        text = f"{DIGIT_WORDS[d1]} {DIGIT_WORDS[d2]}"
        voice = VOICES[a % len(VOICES)]
        wav = _espeak_wav(text, voice) if use_espeak else None
        src = f"espeak-ng:{voice}" if wav is not None else "tone"
        if wav is None:
            wav = _tone_wav(d1, 0.4)
        rel = f"audio/clip_{a:02d}.wav"
        with open(os.path.join(out, rel), "wb") as f:
            f.write(wav)
        prompt = ASR_PROMPTS[rng.integers(len(ASR_PROMPTS))]
        answer = text if src != "tone" else f"A tone coding the digit {d1}."
        tasks["speech_asr"].append({"id": f"asr{a}", "audios": [rel], "audio_source": src,
                                    "messages": _turns([{"type": "audio"}, {
                                        "type": "text", "text": prompt}], answer)})
    for t in range(num_text):
        x, y = (int(v) for v in rng.integers(0, 50, size=2))
        tasks["text_chat"].append({"id": f"txt{t}", "messages": [
            {"role": "user", "content": f"What is {x} plus {y}?"},
            {"role": "assistant", "content": f"{x} plus {y} is {x + y}."}]})
    manifests = {}
    for name, recs in tasks.items():
        path = os.path.join(out, f"{name}.jsonl")
        with open(path, "w") as f:
            for rec in recs:
                f.write(json.dumps(rec) + "\n")
        manifests[name] = path
    return manifests


def train_fixture_tokenizer(manifests: dict[str, str], vocab_size: int,
                            out_prefix: str | os.PathLike, repeat: int = 4) -> str:
    """A SentencePiece model trained on the conversations of the fixture manifests (each record's
    messages as JSON text, the corpus repeated `repeat` times) -> the .model path."""
    from omni_jax.data.tokenizer import train_sentencepiece

    texts = []
    for path in manifests.values():
        with open(path) as f:
            texts += [json.dumps(json.loads(line)["messages"]) for line in f]
    return str(train_sentencepiece(texts * repeat, vocab_size, str(out_prefix)))
