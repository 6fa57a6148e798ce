"""Video front end on the host: uniform frame sampling (arrays or files via PyAV) and Ola's
per-frame area clamp. PyAV (`av`) wheels bundle the FFmpeg libraries: no system ffmpeg."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator

import av
import numpy as np

from omni_jax.data.features.config import ImageConfig, VideoConfig
from omni_jax.data.features.image import normalize, resize

__all__ = ["sample_indices", "sample_frames", "decode_video", "clamp_frame_size",
           "video_pixels"]


def sample_indices(total_frames: int, num_frames: int) -> np.ndarray:
    """Uniform sampling rule: idx_i = floor(i * (T - 1) / (n - 1)) for i = 0..n-1, in exact
    integer arithmetic (np.linspace(0, T - 1, n) truncated, without its float rounding slips):
    first and last frame are always kept; n > T repeats frames; n = 1 takes the middle
    frame (T - 1) // 2. Returns int64 [n]."""
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if total_frames <= 0:
        raise ValueError(f"video has {total_frames} frames; expected at least one")
    if num_frames == 1:
        return np.array([(total_frames - 1) // 2], np.int64)
    i = np.arange(num_frames, dtype=np.int64)
    return (i * (total_frames - 1)) // (num_frames - 1)


def clip_indices(total_frames: int, num_frames: int, repeat: bool = True) -> np.ndarray:
    """sample_indices, except that without `repeat` a clip of fewer than num_frames frames keeps
    each of its frames once (all T of them, in order) instead of repeating some."""
    if not repeat and 0 < total_frames < num_frames:
        return np.arange(total_frames, dtype=np.int64)
    return sample_indices(total_frames, num_frames)


def sample_frames(frames: np.ndarray, num_frames: int, repeat: bool = True) -> np.ndarray:
    """[T, H, W, 3] uint8 frames -> [num_frames, H, W, 3] by sample_indices (without `repeat`,
    a shorter clip's T frames as they are: clip_indices)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got shape {frames.shape}")
    return frames[clip_indices(frames.shape[0], num_frames, repeat)]


def _open(source: bytes | str | os.PathLike) -> av.container.InputContainer:
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise ValueError("decode_video: empty video bytes; expected an encoded file")
        source = io.BytesIO(bytes(source))
    try:
        return av.open(source, mode="r")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise ValueError(f"cannot decode video: {e}") from e


def _decode(source: bytes | str | os.PathLike) -> Iterator[av.VideoFrame]:
    container = _open(source)
    try:
        if not container.streams.video:
            raise ValueError("cannot decode video: the file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        yield from container.decode(stream)
    except av.FFmpegError as e:
        raise ValueError(f"cannot decode video: {e}") from e
    finally:
        container.close()


def decode_video(source: bytes | str | os.PathLike, num_frames: int, repeat: bool = True
                 ) -> np.ndarray:
    """Encoded video (bytes or path) -> [num_frames, H, W, 3] uint8 RGB, uniformly sampled
    (sample_indices) over all decoded frames (without `repeat`, a shorter clip's frames once
    each: clip_indices). Only the sampled frames are converted to RGB; the count comes from a
    first decode pass (container metadata is often missing/wrong)."""
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    total = sum(1 for _ in _decode(source))
    if total == 0:
        raise ValueError("decode_video: the video has zero frames; expected at least one")
    wanted = clip_indices(total, num_frames, repeat)
    picked: dict[int, np.ndarray] = {}
    keep = set(wanted.tolist())
    for i, frame in enumerate(_decode(source)):
        if i in keep:
            picked[i] = frame.to_ndarray(format="rgb24")  # [H, W, 3]
    if len(picked) != len(keep):
        raise ValueError(f"cannot decode video: second pass gave {len(picked)} of "
                         f"{len(keep)} sampled frames")
    return np.stack([picked[i] for i in wanted.tolist()])


def clamp_frame_size(height: int, width: int, config: VideoConfig) -> tuple[int, int]:
    """Ola frame sizing: keep the aspect ratio and scale so the area lies in
    [min_area, max_area] (scale 1 if already inside). Sides are rounded to the nearest
    multiple of size_multiple (at least one); if that breaks the bound, they are floored
    (too large) or ceiled (too small) instead."""
    if height <= 0 or width <= 0:
        raise ValueError(f"clamp_frame_size: size must be positive, got ({height}, {width})")
    area = height * width
    scale = 1.0
    if area > config.max_area:
        scale = math.sqrt(config.max_area / area)
    elif area < config.min_area:
        scale = math.sqrt(config.min_area / area)
    m = config.size_multiple
    h, w = height * scale / m, width * scale / m
    rh, rw = max(1, round(h)) * m, max(1, round(w)) * m
    if rh * rw > config.max_area:
        rh, rw = max(1, math.floor(h)) * m, max(1, math.floor(w)) * m
    elif rh * rw < config.min_area:
        rh, rw = math.ceil(h) * m, math.ceil(w) * m
    return rh, rw


def video_pixels(frames: np.ndarray, video: VideoConfig, image: ImageConfig) -> np.ndarray:
    """[T, H, W, 3] uint8 -> [num_frames, h, w, 3] float32: sample, resize every frame to
    clamp_frame_size, normalize like images (image config's mean/std/filter)."""
    sampled = sample_frames(frames, video.num_frames)
    if sampled.dtype != np.uint8:
        raise ValueError(f"frames dtype must be uint8, got {sampled.dtype}")
    h, w = clamp_frame_size(sampled.shape[1], sampled.shape[2], video)
    return normalize(np.stack([resize(f, h, w, image) for f in sampled]), image)
