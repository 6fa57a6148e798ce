"""espeak-ng voices of the omni_digits splits, speaking styles, and the renderer.

User-side speech (ASR clips, spoken questions) uses the voices of its split (train: also a
random pitch and speed per clip, `user_style`). The voices are
espeak-ng accents (`espeak-ng --voices=en`) with a variant (`espeak-ng --voices=variant`);
the three lists are disjoint as voice strings *and* as variants, so the test voices (m6, m7,
m8 variants) are never heard in train or validation. Spoken answers (speech-out targets) use
one fixed assistant voice that is in no split list: it is the model's own voice.

Styles are espeak-ng prosody settings (pitch 0-99, speed in words per minute, amplitude
0-200): answers are rendered NEUTRAL (the DPO "rejected" side) or in one of the EXPRESSIVE
styles (higher pitch, faster, louder: the "chosen" side of emotional-speech DPO).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

SAMPLE_RATE = 16_000
SPLITS = ("train", "validation", "test")
VOICES = {
    # 8 numbered variants + 24 named ones (espeak-ng-data/voices/!v), each a distinct sound
    "train": ("en-us+m1", "en+f1", "en-us+m3", "en-gb-x-rp+f2", "en-029+m2",
              "en-gb-scotland+f3", "en-us-nyc+m4", "en-gb-x-gbclan+f4",
              "en-us+Andy", "en-029+Annie", "en-gb-scotland+Alex", "en-gb-x-gbclan+Gene",
              "en-us-nyc+Jacky", "en-gb-x-rp+Lee", "en+Mario", "en-us+Michael", "en-us+Storm",
              "en-029+adam", "en-gb-scotland+anika", "en-gb-x-gbclan+david",
              "en-us-nyc+edward", "en-gb-x-rp+iven", "en+john", "en-us+linda", "en-us+max",
              "en-029+paul", "en-gb-scotland+quincy", "en-gb-x-gbclan+rob",
              "en-us-nyc+steph", "en-gb-x-rp+travis", "en+zac", "en-us+benjamin"),
    "validation": ("en-gb-x-gbcwmd+m5", "en-us+f5"),
    "test": ("en+m6", "en-us+m7", "en-gb-x-rp+m8"),
}
ASSISTANT_VOICE = "en-us"


class Style(NamedTuple):
    """espeak-ng prosody: -p pitch (0-99), -s speed (words/min), -a amplitude (0-200)."""

    name: str
    pitch: int
    speed: int
    amplitude: int


USER = Style("user", 50, 170, 100)
NEUTRAL = Style("neutral", 50, 160, 100)
EXPRESSIVE = (Style("excited", 80, 200, 130), Style("cheerful", 75, 190, 120),
              Style("elated", 90, 210, 140))
STYLES = {s.name: s for s in (USER, NEUTRAL, *EXPRESSIVE)}
# train-split user speech: pitch and speed drawn per clip from these ranges (inclusive), so a
# model meets more than 32 fixed speakers; validation / test speak the USER style
TRAIN_PROSODY = {"pitch": (25, 75), "speed": (140, 200)}


def user_style(split: str, rng: np.random.Generator) -> Style:
    """The prosody of one user clip of a split: USER, or for train a random TRAIN_PROSODY."""
    if split not in VOICES:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if split != "train":
        return USER
    (p0, p1), (s0, s1) = TRAIN_PROSODY["pitch"], TRAIN_PROSODY["speed"]
    return Style("user", int(rng.integers(p0, p1 + 1)), int(rng.integers(s0, s1 + 1)),
                 USER.amplitude)


def voices(split: str) -> tuple[str, ...]:
    """The espeak-ng voices of a split."""
    if split not in VOICES:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    return VOICES[split]


def espeak_exe() -> str:
    """Path of the espeak-ng binary; ValueError when it is not installed."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise ValueError("omni_digits needs the espeak-ng binary on PATH (apt-get install "
                         "espeak-ng); it was not found")
    return exe


def espeak_version() -> str:
    """`espeak-ng --version` (first line), recorded in the dataset metadata."""
    res = subprocess.run([espeak_exe(), "--version"], capture_output=True, text=True,
                         timeout=30, check=False)
    line = res.stdout.strip().splitlines()[0] if res.stdout.strip() else "unknown"
    return line.split("  Data at")[0].strip()


RENDER_CACHE = 4096  # renderings kept (_render's cache); render_many fills at most this many


@functools.lru_cache(maxsize=RENDER_CACHE)
def _render(text: str, voice: str, style: Style) -> np.ndarray:
    from omni_jax.data.features import audio as afeat
    from omni_jax.data.features.config import AudioConfig

    cmd = [espeak_exe(), "-v", voice, "-p", str(style.pitch), "-s", str(style.speed), "-a",
           str(style.amplitude), "--stdout", text]
    res = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    if res.returncode != 0 or len(res.stdout) <= 44:
        raise ValueError(f"espeak-ng failed for voice {voice!r} on {text!r}: "
                         f"{res.stderr.decode(errors='replace').strip()}")
    wav = afeat.decode_audio(res.stdout, AudioConfig(sampling_rate=SAMPLE_RATE))
    wav = trim(wav)
    pcm = np.round(np.clip(wav, -1.0, 1.0) * 32767.0).astype(np.int16)
    pcm.setflags(write=False)  # shared by the cache
    return pcm


def trim(wav: np.ndarray, rel_threshold: float = 0.02, margin_s: float = 0.05
         ) -> np.ndarray:
    """Cut leading / trailing silence (|x| < rel_threshold * peak), keeping margin_s."""
    loud = np.flatnonzero(np.abs(wav) >= rel_threshold * max(float(np.abs(wav).max()), 1e-6))
    if loud.size == 0:
        return wav
    m = int(margin_s * SAMPLE_RATE)
    return wav[max(0, loud[0] - m):loud[-1] + 1 + m]


def render(text: str, voice: str, style: Style | str = USER) -> np.ndarray:
    """text -> int16 mono waveform [samples] at 16 kHz, spoken by espeak-ng (cached)."""
    if isinstance(style, str):
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r}; expected one of {sorted(STYLES)}")
        style = STYLES[style]
    if not text.strip():
        raise ValueError("render: empty text; expected words to speak")
    return _render(text, voice, style)


def render_many(items: Iterable[tuple[str, str, Style]], workers: int | None = None) -> int:
    """Render (text, voice, style) items ahead of their render() calls, several espeak-ng
    processes at a time (threads: each waits on its subprocess), into render's cache: the same
    waveforms as rendering them one by one. Returns the number of distinct items rendered; more
    than RENDER_CACHE would evict each other, so that is refused."""
    todo = list(dict.fromkeys((t, v, s if isinstance(s, Style) else STYLES[s])
                              for t, v, s in items))
    if len(todo) > RENDER_CACHE:
        raise ValueError(f"render_many: {len(todo)} distinct renderings exceed the cache of "
                         f"{RENDER_CACHE}; pass at most that many at a time")
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"render_many: workers must be >= 1, got {workers}")
    if workers == 1 or len(todo) < 2:
        for t, v, s in todo:
            render(t, v, s)
    else:  # the first one alone: librosa's lazy imports are not thread-safe
        render(*todo[0])
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda a: render(*a), todo[1:]))
    return len(todo)
