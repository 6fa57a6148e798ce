"""Speech units -> waveform. `Vocoder` is the interface; `MelTableVocoder` needs no weights.

Interface: any object with `sample_rate: int` and `__call__(units [frames] int) -> float32
waveform [samples]` is a `Vocoder`. A neural unit vocoder (e.g. a unit HiFi-GAN or CosyVoice's
flow + HiFi-GAN) plugs in by implementing exactly that: load its params in `__init__`, validate
units with `omni_jax.speech.units.check_units(units, vocab_size)`, run its jitted apply and
return host float32 audio; the rest of the stack only sees the protocol.

MelTableVocoder: one log-mel frame per unit, the mean of the training frames k-means assigned to
that unit (units never seen get the global mean). Synthesis: look up a frame per unit at the
unit frame rate, moving-average `smoothing` frames either side, invert the Whisper log scale
to mel power, NNLS onto the linear spectrum (the repo's mel filters), then Griffin-Lim with a
fixed random phase init (deterministic for `seed`). The mel analysis is the repo's log-mel with
hop = sample_rate / frame_rate, so len(units) frames give len(units) * hop samples. Saved next
to the tokenizer as vocoder.json (config, vocab, rates) + vocoder.npz (table, counts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import librosa
import numpy as np
import scipy.ndimage

from omni_jax.config_base import StrictConfig, check_positive
from omni_jax.data.features.audio import log_mel, mel_filters
from omni_jax.data.features.config import AudioConfig
from omni_jax.speech.units import UnitTokenizer, check_units, prepare_waveform, read_pair

__all__ = ["Vocoder", "VocoderConfig", "MelTableVocoder"]

FORMAT = "omni_jax.speech.mel_table_vocoder/1"


@runtime_checkable
class Vocoder(Protocol):
    """Units [frames] (ints in [0, vocab)) -> float32 waveform [samples] at sample_rate."""

    sample_rate: int

    def __call__(self, units: np.ndarray) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class VocoderConfig(StrictConfig):
    """Mel table analysis and Griffin-Lim synthesis settings."""

    n_mels: int = 80
    n_fft: int = 1024
    hop_length: int = 0  # 0: sample_rate // frame_rate of the tokenizer (required value)
    fmin: float = 0.0
    fmax: float = 0.0  # 0: sample_rate / 2
    smoothing: int = 1  # moving average over +-smoothing frames of the log-mel (0: off)
    n_iter: int = 32  # Griffin-Lim iterations
    momentum: float = 0.99  # fast Griffin-Lim
    seed: int = 0  # random phase init of Griffin-Lim (deterministic)

    def __post_init__(self) -> None:
        check_positive("VocoderConfig", n_mels=self.n_mels, n_fft=self.n_fft,
                       n_iter=self.n_iter)
        if self.hop_length < 0 or self.smoothing < 0 or self.fmin < 0 or self.fmax < 0:
            raise ValueError(f"VocoderConfig: hop_length, smoothing, fmin, fmax must be >= 0, "
                             f"got {self.hop_length}, {self.smoothing}, {self.fmin}, "
                             f"{self.fmax}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"VocoderConfig.momentum must be in [0, 1), got {self.momentum}")

    def audio_config(self, sample_rate: int, frame_rate: int) -> AudioConfig:
        """The repo's log-mel front end at the unit frame rate (hop = sample_rate / rate)."""
        hop = sample_rate // frame_rate
        if self.hop_length and self.hop_length != hop:
            raise ValueError(f"VocoderConfig.hop_length={self.hop_length} must equal "
                             f"sample_rate / frame_rate = {hop} (one unit per hop)")
        if hop * frame_rate != sample_rate:
            raise ValueError(f"VocoderConfig: frame_rate {frame_rate} does not divide "
                             f"sample_rate {sample_rate}")
        return AudioConfig(sampling_rate=sample_rate, n_mels=self.n_mels, n_fft=self.n_fft,
                           hop_length=hop, pad_to_chunk=False, fmin=self.fmin,
                           fmax=self.fmax or sample_rate / 2)


class MelTableVocoder:
    """Units -> per-unit mean log-mel frames -> Griffin-Lim waveform (no weights)."""

    def __init__(self, table: np.ndarray, counts: np.ndarray, config: VocoderConfig,
                 sample_rate: int, frame_rate: int) -> None:
        table, counts = np.asarray(table, np.float32), np.asarray(counts, np.int64)
        if table.ndim != 2 or table.shape[1] != config.n_mels or counts.shape != table[:, 0].shape:
            raise ValueError(f"MelTableVocoder: table {table.shape} / counts {counts.shape} "
                             f"must be [vocab, n_mels={config.n_mels}] / [vocab]")
        if not np.isfinite(table).all():
            raise ValueError("MelTableVocoder: table has non-finite values")
        self.table, self.counts, self.config = table, counts, config
        self.sample_rate, self.frame_rate = int(sample_rate), int(frame_rate)
        self.audio = config.audio_config(self.sample_rate, self.frame_rate)
        self._fingerprint: str | None = None

    @property
    def vocab_size(self) -> int:
        return self.table.shape[0]

    @property
    def hop_length(self) -> int:
        return self.audio.hop_length

    @property
    def fingerprint(self) -> str:
        """sha256 of what synthesis reads (table, config, rates): equal fingerprints voice
        equal units identically, so their results may be cached."""
        if self._fingerprint is None:
            h = hashlib.sha256(self.table.tobytes())
            h.update(json.dumps([self.config.to_dict(), self.sample_rate, self.frame_rate],
                                sort_keys=True).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    @classmethod
    def fit(cls, tokenizer: UnitTokenizer, wavs: Sequence[Any],
            config: VocoderConfig | None = None) -> MelTableVocoder:
        """Average the log-mel frames each unit is assigned in `wavs` (1-D at the tokenizer's
        rate, or (wav, sr) pairs)."""
        config = config or VocoderConfig()
        tc = tokenizer.config
        audio = config.audio_config(tc.sample_rate, tc.frame_rate)
        if len(wavs) == 0:
            raise ValueError("MelTableVocoder.fit: no waveforms")
        sums = np.zeros((tc.vocab_size, config.n_mels), np.float64)
        counts = np.zeros(tc.vocab_size, np.int64)
        frames = []
        for i, item in enumerate(wavs):
            w, sr = item if isinstance(item, tuple) else (item, tc.sample_rate)
            w = prepare_waveform(w, sr, tc.sample_rate, f"MelTableVocoder.fit[{i}]")
            units = tokenizer.encode(w, tc.sample_rate)
            mel = log_mel(w, audio).T  # [len // hop, n_mels], one row per unit frame
            t = min(len(units), mel.shape[0])
            np.add.at(sums, units[:t], mel[:t])
            counts += np.bincount(units[:t], minlength=tc.vocab_size)
            frames.append(mel[:t])
        table = np.broadcast_to(np.concatenate(frames).mean(0), sums.shape).copy()
        seen = counts > 0
        table[seen] = sums[seen] / counts[seen, None]
        return cls(table, counts, config, tc.sample_rate, tc.frame_rate)

    def mel(self, units: Any) -> np.ndarray:
        """Units -> smoothed Whisper-scale log-mel [n_mels, frames]."""
        u = check_units(units, self.vocab_size, "MelTableVocoder")
        m = self.table[u]  # [frames, n_mels]
        s = self.config.smoothing
        if s and len(u) > 1:
            m = scipy.ndimage.uniform_filter1d(m, 2 * s + 1, axis=0, mode="nearest")
        return np.ascontiguousarray(m.T)

    def __call__(self, units: np.ndarray) -> np.ndarray:
        """Units [frames] -> float32 waveform [frames * hop_length] at sample_rate."""
        m = self.mel(units)
        power = 10.0 ** (4.0 * m.astype(np.float64) - 4.0)  # undo (log10(p) + 4) / 4
        fb = mel_filters(self.audio).T  # [n_mels, freq]
        mag = np.sqrt(np.maximum(librosa.util.nnls(fb, power), 0.0))  # [freq, frames]
        n = m.shape[1] * self.hop_length
        mag = np.concatenate([mag, mag[:, -1:]], 1)  # a centred STFT of n samples: frames + 1
        wav = librosa.griffinlim(mag, n_iter=self.config.n_iter, hop_length=self.hop_length,
                                 n_fft=self.config.n_fft, window="hann", center=True,
                                 length=n, momentum=self.config.momentum, init="random",
                                 random_state=np.random.RandomState(self.config.seed))
        return wav.astype(np.float32)

    def save(self, directory: str | os.PathLike) -> None:
        """Write vocoder.json + vocoder.npz (usually into the tokenizer's directory)."""
        os.makedirs(directory, exist_ok=True)
        meta = {"format": FORMAT, "config": self.config.to_dict(), "vocab_size": self.vocab_size,
                "sample_rate": self.sample_rate, "frame_rate": self.frame_rate}
        with open(os.path.join(directory, "vocoder.json"), "w") as f:
            json.dump(meta, f, indent=1)
        np.savez(os.path.join(directory, "vocoder.npz"), table=self.table, counts=self.counts)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> MelTableVocoder:
        """Read a saved vocoder; cross-checked against units.json when it is in the same dir."""
        meta, arrays = read_pair(directory, "vocoder", ("table", "counts"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{directory}: vocoder.json format {meta.get('format')!r} is not "
                             f"{FORMAT!r}")
        try:
            config = VocoderConfig.from_dict(meta["config"])
            vocab, sr, rate = (int(meta[k]) for k in ("vocab_size", "sample_rate", "frame_rate"))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{directory}: vocoder.json lacks or mangles {e}") from e
        if arrays["table"].shape[:1] != (vocab,):
            raise ValueError(f"{directory}: table {arrays['table'].shape} does not match "
                             f"vocab_size={vocab}")
        units_json = os.path.join(directory, "units.json")
        if os.path.isfile(units_json):
            with open(units_json) as f:
                uc = json.load(f).get("config", {})
            theirs = (uc.get("vocab_size"), uc.get("sample_rate"), uc.get("frame_rate"))
            if theirs != (vocab, sr, rate):
                raise ValueError(f"{directory}: vocoder (vocab, sample_rate, frame_rate) "
                                 f"{(vocab, sr, rate)} != the tokenizer's {theirs}")
        return cls(arrays["table"], arrays["counts"], config, sr, rate)
