"""Ola's dual audio path: per 30 s chunk, Whisper(log-mel) ++ BEATs(waveform) on channels.

A waveform is cut into chunks of `chunk_seconds` (last one zero-padded, at most `max_chunks`,
the rest dropped — as Ola's loader). The model takes, per chunk, the precomputed Whisper log-mel
[chunks, n_mels, frames] (omni_jax.data.features.audio) and the raw chunk samples for BEATs.
Whisper frames (1500 per 30 s) and BEATs tokens (1496 per 30 s) are brought to a common length
(`align="max"`: zero-pad the shorter, as Ola's code; `"whisper"`: pad/truncate BEATs to Whisper's
length) and concatenated as [whisper | beats] channels. Without a BEATs config it is the plain
Whisper path (OpenOmni, Capybara). With `mask_padding`, BEATs gets unilm's sample padding mask
(its forward_padding_mask reduction to tokens, see omni_jax.encoders.beats).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.config_base import StrictConfig, check_choice, check_positive
from omni_jax.encoders.audio import WhisperEncoder, WhisperEncoderConfig, output_frame_mask
from omni_jax.encoders.beats import BEATsConfig, BEATsEncoder
from omni_jax.layers.common import constrain

ALIGN = ("max", "whisper")


@dataclasses.dataclass(frozen=True)
class OlaAudioConfig(StrictConfig):
    """Chunking + the two encoders; `beats=None` gives a Whisper-only path."""

    whisper: WhisperEncoderConfig = dataclasses.field(default_factory=WhisperEncoderConfig)
    beats: BEATsConfig | None = dataclasses.field(default_factory=BEATsConfig)
    sample_rate: int = 16000
    chunk_seconds: float = 30.0
    max_chunks: int = 25
    mel_hop_length: int = 160  # Whisper feature hop: valid samples -> valid mel frames
    align: str = "max"
    mask_padding: bool = False  # Ola: no masks; True: padded samples masked in both encoders

    def __post_init__(self) -> None:
        check_positive("OlaAudioConfig", sample_rate=self.sample_rate,
                       chunk_seconds=self.chunk_seconds, max_chunks=self.max_chunks,
                       mel_hop_length=self.mel_hop_length)
        check_choice("OlaAudioConfig", "align", self.align, ALIGN)
        if self.beats is not None and self.beats.sample_rate != self.sample_rate:
            raise ValueError(f"OlaAudioConfig: beats.sample_rate={self.beats.sample_rate} != "
                             f"sample_rate={self.sample_rate}")
        frames = self.mel_frames
        if frames % 2 or frames > self.whisper.max_frames:
            raise ValueError(f"OlaAudioConfig: a chunk gives {frames} mel frames "
                             f"(chunk_samples // mel_hop_length); Whisper needs an even number "
                             f"<= {self.whisper.max_frames}")

    @property
    def chunk_samples(self) -> int:
        return int(round(self.sample_rate * self.chunk_seconds))

    @property
    def mel_frames(self) -> int:
        return self.chunk_samples // self.mel_hop_length

    @property
    def whisper_frames(self) -> int:
        return self.mel_frames // 2

    @property
    def beats_tokens(self) -> int:
        return 0 if self.beats is None else self.beats.num_tokens(self.chunk_samples)

    @property
    def num_frames(self) -> int:
        """Rows per chunk after alignment (what the speech projector sees)."""
        if self.align == "whisper" or self.beats is None:
            return self.whisper_frames
        return max(self.whisper_frames, self.beats_tokens)

    @property
    def out_dim(self) -> int:
        return self.whisper.d_model + (0 if self.beats is None else self.beats.encoder_embed_dim)

    def num_chunks(self, num_samples: int) -> int:
        """Chunks for a waveform of `num_samples` (ceil, capped at max_chunks)."""
        if num_samples <= 0:
            raise ValueError(f"OlaAudioConfig: empty waveform ({num_samples} samples)")
        return min(math.ceil(num_samples / self.chunk_samples), self.max_chunks)

    @classmethod
    def _coerce(cls, d: dict[str, Any]) -> dict[str, Any]:
        """from_dict: nested dicts for `whisper` / `beats` (None disables BEATs)."""
        if isinstance(d.get("whisper"), Mapping):
            d["whisper"] = WhisperEncoderConfig.from_dict(d["whisper"])
        if isinstance(d.get("beats"), Mapping):
            d["beats"] = BEATsConfig.from_dict(d["beats"])
        return d


def chunk_waveform(waveform: np.ndarray, config: OlaAudioConfig) -> tuple[np.ndarray, np.ndarray]:
    """[samples] -> (chunks [n, chunk_samples] float32, valid samples per chunk [n] int32)."""
    w = np.asarray(waveform)
    if w.ndim != 1 or not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"chunk_waveform: expected a 1-D float waveform, got shape {w.shape} "
                         f"dtype {w.dtype}")
    n, cs = config.num_chunks(w.shape[0]), config.chunk_samples
    w = w[: n * cs].astype(np.float32)
    lengths = np.minimum(w.shape[0] - np.arange(n) * cs, cs).astype(np.int32)
    return np.pad(w, (0, n * cs - w.shape[0])).reshape(n, cs), lengths


def _fit(x: jax.Array, mask: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
    """Zero-pad or truncate [n, t, c] (and its [n, t] mask) to `length` rows."""
    t = x.shape[1]
    if t >= length:
        return x[:, :length], mask[:, :length]
    return jnp.pad(x, ((0, 0), (0, length - t), (0, 0))), jnp.pad(mask, ((0, 0), (0, length - t)))


class OlaAudioEncoder(nn.Module):
    """mel [chunks, n_mels, frames] (+ waveform [chunks, samples]) -> features, row mask."""

    config: OlaAudioConfig

    def _validate(self, mel: Any, waveform: Any, lengths: Any) -> None:
        c = self.config
        shape = tuple(np.shape(mel))
        want = (c.whisper.num_mel_bins, c.mel_frames)
        if len(shape) != 3 or shape[1:] != want:
            raise ValueError(f"OlaAudioEncoder: mel must be [chunks, {want[0]}, {want[1]}], "
                             f"got shape {shape}")
        if shape[0] > c.max_chunks:
            raise ValueError(f"OlaAudioEncoder: {shape[0]} chunks > max_chunks={c.max_chunks}")
        if c.beats is not None:
            if waveform is None:
                raise ValueError("OlaAudioEncoder: the BEATs branch needs the chunk waveforms")
            if tuple(np.shape(waveform)) != (shape[0], c.chunk_samples):
                raise ValueError(f"OlaAudioEncoder: waveform must be [chunks, samples] = "
                                 f"{(shape[0], c.chunk_samples)}, got {tuple(np.shape(waveform))}")
        if lengths is not None and tuple(np.shape(lengths)) != (shape[0],):
            raise ValueError(f"OlaAudioEncoder: lengths must be [chunks] = ({shape[0]},), got "
                             f"{tuple(np.shape(lengths))}")

    @nn.compact
    def __call__(self, mel: jax.Array, waveform: jax.Array | None = None,
                 lengths: jax.Array | None = None) -> dict[str, jax.Array]:
        """lengths: valid samples per chunk (from chunk_waveform); used iff mask_padding.

        Returns {"features": [chunks, num_frames, out_dim] ([whisper | beats] channels),
        "mask": [chunks, num_frames] bool, True where either part holds a real row}.
        """
        self._validate(mel, waveform, lengths)
        c = self.config
        masked = c.mask_padding and lengths is not None
        frame_lengths = None
        if masked:
            frame_lengths = jnp.minimum(-(-lengths // c.mel_hop_length), c.mel_frames)
        w = WhisperEncoder(c.whisper, name="whisper")(mel, lengths=frame_lengths)  # [n, tw, dw]
        if masked:
            w_mask = output_frame_mask(jnp.arange(c.mel_frames)[None] < frame_lengths[:, None])
        else:
            w_mask = jnp.ones(w.shape[:2], bool)
        if c.beats is None:
            return {"features": w, "mask": w_mask}
        b, b_mask = BEATsEncoder(c.beats, name="beats")(
            waveform, lengths=lengths if masked else None)  # [n, tb, db]
        rows = c.num_frames
        w, w_mask = _fit(w, w_mask, rows)
        b, b_mask = _fit(b.astype(w.dtype), b_mask, rows)
        feats = constrain(jnp.concatenate([w, b], axis=-1), ("act_batch", "act_len", None))
        return {"features": feats, "mask": w_mask | b_mask}
