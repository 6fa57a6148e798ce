"""TowerConfig.short_clips: a clip shorter than num_frames repeated (uniform rule) or padded
with blank frames after it or before it, so how many frames it had stays visible to the model."""

import io

import numpy as np
import pytest
from PIL import Image

from omni_jax.data.features import video as vfeat
from omni_jax.data.omni import OmniEncoder
from omni_jax.omni_config import OmniConfig, TowerConfig

D = 16


def _config(short_clips: str) -> OmniConfig:
    return OmniConfig.from_dict({
        "llm": dict(vocab_size=64, hidden_size=D, intermediate_size=32, num_layers=1,
                    num_heads=2, num_kv_heads=1),
        "image": dict(encoder="siglip", adapter="mlp", adapter_config=dict(out_dim=D),
                      encoder_config=dict(hidden_size=8, intermediate_size=16, num_layers=1,
                                          num_heads=2, image_size=16, patch_size=8),
                      image_size=[16, 16]),
        "video": dict(encoder="shared:image", adapter="mlp", adapter_config=dict(out_dim=D),
                      image_size=[16, 16], num_frames=5, short_clips=short_clips)})


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("total,repeat,want", [
    (3, True, [0, 0, 1, 1, 2]), (3, False, [0, 1, 2]), (5, False, [0, 1, 2, 3, 4]),
    (9, False, [0, 2, 4, 6, 8]), (1, False, [0])])
def test_clip_indices(total, repeat, want):
    assert vfeat.clip_indices(total, 5, repeat).tolist() == want


def test_pad_keeps_each_frame_once_then_blank_frames():
    frames = [_png(v) for v in (10, 120, 250)]
    pad = OmniEncoder(_config("pad"), None)._video(frames)
    rep = OmniEncoder(_config("repeat"), None)._video(frames)
    assert pad.shape == rep.shape == (5, 16, 16, 3)
    np.testing.assert_array_equal(pad[:3], rep[[0, 2, 4]])  # the clip's own frames, in order
    assert not np.any(pad[3:])  # blank (zero after normalisation)
    assert np.all(pad[:3] != 0)
    np.testing.assert_array_equal(rep[0], rep[1])  # the uniform rule repeats frame 0
    long = [_png(v) for v in range(0, 250, 25)]  # 10 frames: sampled as before, no padding
    np.testing.assert_array_equal(OmniEncoder(_config("pad"), None)._video(long),
                                  OmniEncoder(_config("repeat"), None)._video(long))


def test_pad_front_puts_the_blank_frames_before_the_clip():
    frames = [_png(v) for v in (10, 120, 250)]
    pad = OmniEncoder(_config("pad"), None)._video(frames)
    front = OmniEncoder(_config("pad_front"), None)._video(frames)
    assert front.shape == (5, 16, 16, 3)
    assert not np.any(front[:2])  # blank slots first
    np.testing.assert_array_equal(front[2:], pad[:3])  # then the clip, its last frame last
    long = [_png(v) for v in range(0, 250, 25)]  # no padding: as "pad"
    np.testing.assert_array_equal(OmniEncoder(_config("pad_front"), None)._video(long),
                                  OmniEncoder(_config("pad"), None)._video(long))


def test_short_clips_validated():
    with pytest.raises(ValueError, match="short_clips must be one of"):
        _config("loop")
    for mode in ("pad", "pad_front"):
        with pytest.raises(ValueError, match="short_clips must be one of"):
            TowerConfig("image", "siglip", "mlp", short_clips=mode)
