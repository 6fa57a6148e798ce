"""SigLIP pixel parity with transformers' SiglipImageProcessorPil; tiling; Ola views; errors."""

import io
import os
from fractions import Fraction

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from transformers.models.siglip.image_processing_pil_siglip import (  # noqa: E402
    SiglipImageProcessorPil,
)

from omni_jax.data.features.config import ImageConfig  # noqa: E402
from omni_jax.data.features.image import (  # noqa: E402
    decode_image,
    normalize,
    ola_highres_size,
    ola_lowres_size,
    ola_views,
    preprocess,
    select_grid,
    tile_image,
    to_rgb,
)

TOL = 1e-5


def _hf(image, size):
    proc = SiglipImageProcessorPil(size={"height": size, "width": size})
    out = proc(image, return_tensors="np", input_data_format="channels_last")["pixel_values"]
    return out.transpose(0, 2, 3, 1)  # NCHW -> NHWC


def _rand(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("size", [224, 384])
def test_siglip_parity_sizes_and_aspects(size):
    images = [_rand(hw + (3,), i) for i, hw in
              enumerate([(480, 640), (size, size), (90, 700), (1000, 300), (37, 53)])]
    ours = preprocess(images, ImageConfig(image_size=size))
    assert ours.shape == (5, size, size, 3) and ours.dtype == np.float32
    for im, o in zip(images, ours):
        assert np.abs(o - _hf(im, size)[0]).max() <= TOL
    np.testing.assert_array_equal(preprocess(images, ImageConfig(image_size=size),
                                             num_threads=1), ours)


def test_per_channel_normalize_matches_formula_and_out():
    """Per-channel mean/std (CLIP-style) takes the 3-table path; out= is filled in place."""
    cfg = ImageConfig(image_size=8, image_mean=(0.48, 0.46, 0.41), image_std=(0.27, 0.26, 0.28))
    x = _rand((2, 8, 8, 3), 3)
    scaled = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    want = (scaled - np.float32(cfg.image_mean)) / np.float32(cfg.image_std)
    np.testing.assert_array_equal(normalize(x, cfg), want)
    out = np.zeros((2, 8, 8, 3), np.float32)
    assert normalize(x, cfg, out=out) is out
    np.testing.assert_array_equal(out, want)


def test_gray_and_rgba_converted_like_transformers():
    cfg = ImageConfig(image_size=64)
    gray = _rand((50, 70, 1), 3)
    rgba = _rand((50, 70, 4), 4)
    rgba[:5, :, 3] = 0  # fully transparent rows -> white
    for im in (gray, rgba):
        assert np.abs(preprocess([im], cfg)[0] - _hf(im, 64)[0]).max() <= TOL
    np.testing.assert_array_equal(preprocess([gray[..., 0]], cfg), preprocess([gray], cfg))
    assert (to_rgb(rgba)[:5] == 255).all()
    opaque = rgba.copy()
    opaque[..., 3] = 255
    np.testing.assert_array_equal(to_rgb(opaque), opaque[..., :3])


def test_strict_channels_raise():
    cfg = ImageConfig(image_size=32, strict_channels=True)
    for shape in [(20, 20), (20, 20, 1), (20, 20, 4)]:
        with pytest.raises(ValueError, match="3 \\(RGB\\) are expected"):
            preprocess([_rand(shape)], cfg)
    assert preprocess([_rand((20, 20, 3))], cfg).shape == (1, 32, 32, 3)


def test_image_input_errors():
    cfg = ImageConfig(image_size=32)
    with pytest.raises(ValueError, match="image has 2 channels"):
        preprocess([_rand((8, 8, 2))], cfg)
    with pytest.raises(ValueError, match="image has 5 channels"):
        preprocess([_rand((8, 8, 5))], cfg)
    with pytest.raises(ValueError, match="empty image"):
        preprocess([np.zeros((0, 8, 3), np.uint8)], cfg)
    with pytest.raises(ValueError, match="dtype must be uint8"):
        preprocess([np.zeros((8, 8, 3), np.float32)], cfg)
    with pytest.raises(ValueError, match=r"must be \[H, W\] or \[H, W, C\]"):
        to_rgb(np.zeros((2, 8, 8, 3, 1), np.uint8))
    with pytest.raises(ValueError, match="empty batch"):
        preprocess([], cfg)
    with pytest.raises(ValueError, match="num_threads must be positive"):
        preprocess([_rand((8, 8, 3))], cfg, num_threads=0)
    with pytest.raises(ValueError, match="unknown keys"):
        ImageConfig.from_dict({"img_size": 3})
    with pytest.raises(ValueError, match="image_std must have 3 values"):
        ImageConfig(image_std=(0.5, 0.5))


def _encode(arr, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_decode_image_modes_and_errors():
    rgb, gray, rgba = _rand((12, 9, 3)), _rand((12, 9)), _rand((12, 9, 4))
    np.testing.assert_array_equal(decode_image(_encode(rgb)), rgb)
    np.testing.assert_array_equal(decode_image(_encode(gray)), gray[..., None])
    np.testing.assert_array_equal(decode_image(_encode(rgba)), rgba)
    assert decode_image(_encode(rgb, "JPEG")).shape == (12, 9, 3)
    with pytest.raises(ValueError, match="empty image bytes"):
        decode_image(b"")
    with pytest.raises(ValueError, match="cannot decode image: "):
        decode_image(b"\x89PNG not really a png" * 4)
    with pytest.raises(ValueError, match="cannot decode image: "):
        decode_image(_encode(rgb)[:60])  # truncated


def _grid_by_rule(h, w, s, n):
    """Independent statement of the rule with Fractions: max effective area, then min waste,
    then the first grid in (rows, cols) order."""
    cands = []
    for r in range(1, n + 1):
        for c in range(1, n + 1):
            if r * c > n:
                continue
            scale = min(Fraction(c * s, w), Fraction(r * s, h))
            eff = min(int(w * scale) * int(h * scale), w * h)
            cands.append((-eff, r * c * s * s - eff, r, c))
    _, _, r, c = min(cands)
    return r, c


def test_select_grid_hand_derived():
    s, n = 384, 9
    assert select_grid(384, 1152, s, n) == (1, 3)  # 1:3 fits exactly at scale 1, no waste
    assert select_grid(768, 768, s, n) == (2, 2)  # exact 2x2 fit
    assert select_grid(100, 200, s, n) == (1, 1)  # every grid caps at native area: least waste
    # 1000 x 3000: rows=1 -> scale <= 0.384; rows=2 (cols<=4) -> min(cols*384/3000, 0.768)
    # = 0.512 at cols=4 -> 512 x 1536 = 786432; rows=3 (cols<=3) -> 0.384. Best: (2, 4)
    assert select_grid(1000, 3000, s, n) == (2, 4)
    assert select_grid(3000, 1000, s, n) == (4, 2)
    # 480 x 640 keeps native area only if rows*384 >= 480 and cols*384 >= 640 -> (2, 2)
    assert select_grid(480, 640, s, n) == (2, 2)


def test_select_grid_matches_rule_statement():
    rng = np.random.default_rng(5)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(20, 4000, 2))
        s, n = int(rng.choice([224, 336, 384])), int(rng.integers(1, 13))
        assert select_grid(h, w, s, n) == _grid_by_rule(h, w, s, n), (h, w, s, n)


def test_tile_image_layout_and_thumbnail():
    s = 32
    cfg = ImageConfig(image_size=s, max_tiles=6, pad_value=0)
    img = _rand((40, 110, 3), 7)
    out = tile_image(img, cfg)
    # rule: (1,3) fits 32 x 88 (eff 2816); (2,3) scale min(96/110, 64/40) -> 34 x 96 = 3264;
    # full native area (4400) needs rows>=2, cols>=4 -> 8 tiles > 6. So (2, 3).
    assert out.grid == (2, 3) == _grid_by_rule(40, 110, s, 6)
    assert out.tiles.shape == (6, s, s, 3) and out.thumbnail.shape == (s, s, 3)
    np.testing.assert_array_equal(out.thumbnail, preprocess([img], cfg)[0])
    # canvas 64 x 96: width-limited, height round(40 * 96 / 110) = 35, centred at row 14
    resized = np.asarray(Image.fromarray(img).resize((96, 35), Image.Resampling.BICUBIC))
    canvas = np.zeros((64, 96, 3), np.uint8)
    canvas[14:49] = resized
    expected = normalize(canvas, cfg)
    for k, (r, c) in enumerate([(r, c) for r in range(2) for c in range(3)]):
        np.testing.assert_array_equal(out.tiles[k], expected[r * s:(r + 1) * s, c * s:(c + 1) * s])
    assert out.views().shape == (7, s, s, 3)
    np.testing.assert_array_equal(out.views()[-1], out.thumbnail)


def test_ola_view_sizes():
    cfg = ImageConfig()
    # 480 x 640: scale sqrt(384^2 / 307200) = 0.6928 -> 332.6 / 32 = 10.4 -> 320; 443.4 -> 448
    assert ola_lowres_size(480, 640, cfg) == (320, 448)
    assert ola_lowres_size(384, 384, cfg) == (384, 384)
    assert ola_highres_size(100, 50, cfg) == ((100, 50), (128, 64))  # native, padded to 32
    assert ola_highres_size(3072, 3072, cfg) == ((1536, 1536), (1536, 1536))  # area 4x cap
    (rh, rw), (ph, pw) = ola_highres_size(3000, 4000, cfg)
    assert rh * rw <= 1536 ** 2 and abs(rw / rh - 4 / 3) < 2e-3
    assert (ph, pw) == (-(-rh // 32) * 32, -(-rw // 32) * 32)
    views = ola_views(_rand((100, 50, 3), 9), cfg.replace(pad_value=255))
    assert views.lowres.shape == ola_lowres_size(100, 50, cfg) + (3,)
    assert views.highres.shape == (128, 64, 3) and views.highres_valid == (100, 50)
    np.testing.assert_array_equal(views.highres[:100, :50], normalize(_rand((100, 50, 3), 9), cfg))
    assert (views.highres[100:] == 1.0).all() and (views.highres[:, 50:] == 1.0).all()
