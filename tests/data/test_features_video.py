"""Video frame sampling (arrays and PyAV-decoded files), frame-size clamp, errors."""

import io
from fractions import Fraction

import av
import numpy as np
import pytest

from omni_jax.data.features.config import ImageConfig, VideoConfig
from omni_jax.data.features.image import normalize, resize
from omni_jax.data.features.video import (
    clamp_frame_size,
    decode_video,
    sample_frames,
    sample_indices,
    video_pixels,
)

T = 23


def _frames(t=T, h=32, w=48, noise=True):
    """Frame k is filled with value 10 * k in red (so a decoded frame names its index)."""
    f = np.zeros((t, h, w, 3), np.uint8)
    f[..., 0] = (np.arange(t) * 10)[:, None, None]
    if noise:
        f[..., 1] = np.random.default_rng(0).integers(0, 256, (t, h, w))
    return f


def _encode(frames, codec="ffv1", fmt="matroska", pix_fmt="bgr0"):
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


@pytest.fixture(scope="module")
def lossless():
    frames = _frames()
    return frames, _encode(frames)


def test_sample_indices_rule():
    assert sample_indices(10, 4).tolist() == [0, 3, 6, 9]
    assert sample_indices(100, 5).tolist() == [0, 24, 49, 74, 99]
    assert sample_indices(3, 5).tolist() == [0, 0, 1, 1, 2]  # fewer frames: repeats
    assert sample_indices(7, 1).tolist() == [3]  # one frame: the middle one
    rng = np.random.default_rng(0)
    for _ in range(50):
        t, n = int(rng.integers(1, 5000)), int(rng.integers(2, 70))
        expected = [int(Fraction(i * (t - 1), n - 1)) for i in range(n)]
        assert sample_indices(t, n).tolist() == expected


def test_sample_frames_from_array():
    frames = _frames()
    out = sample_frames(frames, 6)
    assert out.shape == (6, 32, 48, 3)
    assert (out[:, 0, 0, 0] // 10).tolist() == sample_indices(T, 6).tolist()


def test_decode_lossless_file_samples_right_frames(lossless, tmp_path):
    frames, data = lossless
    out = decode_video(data, 5)
    idx = sample_indices(T, 5)
    np.testing.assert_array_equal(out, frames[idx])
    path = tmp_path / "clip.mkv"
    path.write_bytes(data)
    np.testing.assert_array_equal(decode_video(path, 5), out)  # from a path too


def test_decode_mp4():
    frames = _frames(h=64, w=96, noise=False)
    out = decode_video(_encode(frames, "mpeg4", "mp4", "yuv420p"), 4)
    assert out.shape == (4, 64, 96, 3) and out.dtype == np.uint8
    # lossy, but the red level (10 * index) survives well enough to name the frame
    red = out[:, 16:48, 16:80, 0].astype(float).mean(axis=(1, 2))
    np.testing.assert_allclose(red, sample_indices(T, 4) * 10, atol=4)


def test_video_errors(lossless):
    _, data = lossless
    with pytest.raises(ValueError, match="num_frames must be positive"):
        decode_video(data, 0)
    with pytest.raises(ValueError, match="num_frames must be positive"):
        sample_indices(10, -1)
    with pytest.raises(ValueError, match="video has 0 frames"):
        sample_frames(np.zeros((0, 4, 4, 3), np.uint8), 3)
    with pytest.raises(ValueError, match="empty video bytes"):
        decode_video(b"", 3)
    with pytest.raises(ValueError, match="cannot decode video: "):
        decode_video(b"not a video at all" * 50, 3)
    with pytest.raises(ValueError, match="cannot decode video: "):
        decode_video(data[:200], 3)
    with pytest.raises(ValueError, match=r"frames must be \[T, H, W, 3\]"):
        sample_frames(np.zeros((4, 4, 3), np.uint8), 2)


def test_zero_frame_video_raises():
    buf = io.BytesIO()  # an AVI with a video stream header and no frames
    with av.open(buf, mode="w", format="avi") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 16, 16, "yuv420p"
        c.start_encoding()
    with pytest.raises(ValueError, match="video has zero frames"):
        decode_video(buf.getvalue(), 4)


def test_clamp_frame_size():
    cfg = VideoConfig()
    assert clamp_frame_size(1080, 1920, cfg) == (360, 640)  # area 9x max -> scale 1/3
    assert clamp_frame_size(100, 100, cfg) == (288, 288)  # area below min -> scaled up
    assert clamp_frame_size(300, 400, cfg) == (300, 400)  # inside the range: unchanged
    m32 = cfg.replace(size_multiple=32)
    rng = np.random.default_rng(1)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(16, 3000, 2))
        if max(h, w) > 6 * min(h, w):
            continue  # extreme aspect ratios cannot always meet the bounds on a 32 grid
        rh, rw = clamp_frame_size(h, w, m32)
        assert rh % 32 == 0 and rw % 32 == 0
        assert 288 ** 2 <= rh * rw <= 480 ** 2 or 288 ** 2 <= h * w <= 480 ** 2
    with pytest.raises(ValueError, match="min_area"):
        VideoConfig(min_area=500 ** 2)


def test_video_pixels():
    frames = _frames(t=9, h=200, w=300)  # area 60000 < 288^2 -> scaled up
    v, im = VideoConfig(num_frames=3), ImageConfig()
    out = video_pixels(frames, v, im)
    h, w = clamp_frame_size(200, 300, v)
    assert out.shape == (3, h, w, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[1], normalize(resize(frames[4], h, w, im), im))
