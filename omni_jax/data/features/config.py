"""Frozen, validated configs for the media front ends (audio, image, video)."""

from __future__ import annotations

import dataclasses
from typing import Any

from omni_jax.config_base import StrictConfig, check_positive

RESAMPLE_TYPES = ("soxr_vhq", "soxr_hq", "soxr_mq", "soxr_lq", "polyphase", "kaiser_best",
                  "kaiser_fast", "fft", "scipy")
IMAGE_RESAMPLE = ("bicubic", "bilinear", "nearest", "lanczos")


class _DictMixin(StrictConfig):
    """StrictConfig whose `from_dict` turns lists into tuples."""

    @classmethod
    def _coerce(cls, d: dict[str, Any]) -> dict[str, Any]:
        for k, v in d.items():  # ml_collections / JSON give lists where tuples are meant
            if isinstance(v, list):
                d[k] = tuple(v)
        return d


@dataclasses.dataclass(frozen=True)
class AudioConfig(_DictMixin):
    """Whisper log-mel front end (names follow transformers' WhisperFeatureExtractor)."""

    sampling_rate: int = 16000
    n_mels: int = 80  # 80 (Whisper <= v2) or 128 (large-v3)
    n_fft: int = 400
    hop_length: int = 160
    chunk_seconds: int = 30
    pad_to_chunk: bool = True  # pad/truncate to chunk_seconds (3000 frames) vs. len // hop frames
    fmin: float = 0.0
    fmax: float = 8000.0
    log_floor: float = 1e-10  # mel power clamp before log10
    dynamic_range: float = 8.0  # log10 units kept below each example's max
    resample_type: str = "soxr_hq"  # librosa.resample res_type for other input rates
    max_chunks: int = 25  # chunk_waveform: at most this many chunks (Ola)

    def __post_init__(self) -> None:
        check_positive("AudioConfig", sampling_rate=self.sampling_rate, n_mels=self.n_mels,
                       n_fft=self.n_fft, hop_length=self.hop_length,
                       chunk_seconds=self.chunk_seconds, log_floor=self.log_floor,
                       dynamic_range=self.dynamic_range, max_chunks=self.max_chunks)
        if self.n_fft % 2:
            raise ValueError(f"AudioConfig.n_fft must be even (centered frames), got {self.n_fft}")
        if self.hop_length > self.n_fft:
            raise ValueError(f"AudioConfig.hop_length={self.hop_length} must be <= "
                             f"n_fft={self.n_fft}")
        if not 0.0 <= self.fmin < self.fmax <= self.sampling_rate / 2:
            raise ValueError(f"AudioConfig: need 0 <= fmin < fmax <= sampling_rate / 2, got "
                             f"fmin={self.fmin}, fmax={self.fmax}, "
                             f"sampling_rate={self.sampling_rate}")
        if self.resample_type not in RESAMPLE_TYPES:
            raise ValueError(f"AudioConfig.resample_type {self.resample_type!r} unknown; expected "
                             f"one of {RESAMPLE_TYPES}")

    @property
    def n_samples(self) -> int:
        """Samples in one chunk (480000 for 30 s at 16 kHz)."""
        return self.chunk_seconds * self.sampling_rate

    @property
    def n_frames(self) -> int:
        """Mel frames in one padded chunk (3000)."""
        return self.n_samples // self.hop_length


@dataclasses.dataclass(frozen=True)
class ImageConfig(_DictMixin):
    """SigLIP pixel front end plus tiling and Ola view sizing."""

    image_size: int = 384  # square SigLIP input side (224 in transformers' default)
    resample: str = "bicubic"  # PIL filter used for every resize
    rescale_factor: float = 1.0 / 255.0
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    strict_channels: bool = False  # True: 1- or 4-channel input raises instead of converting
    max_tiles: int = 9  # Capybara: up to 9 sub-images (+ thumbnail)
    pad_value: int = 0  # uint8 pixel used to pad tile canvases and Ola high-res views
    lowres_area: int = 384 * 384  # Ola low-res view: area target
    highres_max_area: int = 1536 * 1536  # Ola high-res view: area cap
    size_multiple: int = 32  # Ola: sides multiple of patch (16) x pooling (2)
    video_min_area: int = 288 * 288  # Ola video frames: area clamped to [min, max],
    video_max_area: int = 480 * 480  # sides multiples of video_multiple (SEEDS)
    video_multiple: int = 64

    def __post_init__(self) -> None:
        check_positive("ImageConfig", image_size=self.image_size,
                       rescale_factor=self.rescale_factor, max_tiles=self.max_tiles,
                       lowres_area=self.lowres_area, highres_max_area=self.highres_max_area,
                       size_multiple=self.size_multiple, video_min_area=self.video_min_area,
                       video_max_area=self.video_max_area, video_multiple=self.video_multiple)
        if self.video_min_area > self.video_max_area:
            raise ValueError(f"ImageConfig: video_min_area={self.video_min_area} exceeds "
                             f"video_max_area={self.video_max_area}")
        if self.resample not in IMAGE_RESAMPLE:
            raise ValueError(f"ImageConfig.resample {self.resample!r} unknown; expected one of "
                             f"{IMAGE_RESAMPLE}")
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            if len(v) != 3:
                raise ValueError(f"ImageConfig.{name} must have 3 values (RGB), got {v!r}")
        if min(self.image_std) <= 0:
            raise ValueError(f"ImageConfig.image_std must be positive, got {self.image_std!r}")
        if not 0 <= self.pad_value <= 255:
            raise ValueError(f"ImageConfig.pad_value must be a uint8 value, got {self.pad_value}")


@dataclasses.dataclass(frozen=True)
class VideoConfig(_DictMixin):
    """Frame sampling and per-frame sizing (Ola: up to 64 frames, area in [288^2, 480^2])."""

    num_frames: int = 64
    min_area: int = 288 * 288
    max_area: int = 480 * 480
    size_multiple: int = 1  # round frame sides to a multiple of this (1 = no rounding)

    def __post_init__(self) -> None:
        check_positive("VideoConfig", num_frames=self.num_frames, min_area=self.min_area,
                       max_area=self.max_area, size_multiple=self.size_multiple)
        if self.min_area > self.max_area:
            raise ValueError(f"VideoConfig: min_area={self.min_area} > max_area={self.max_area}")
