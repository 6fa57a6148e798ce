"""SiglipVisionEncoder vs transformers' SiglipVisionModel (fp32, tiny random config), the
torch-exact resize, and input / config validation."""

import os
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from flax.core import meta  # noqa: E402

from omni_jax.convert.siglip import import_siglip_vision  # noqa: E402
from omni_jax.encoders.vision import SiglipVisionConfig, SiglipVisionEncoder  # noqa: E402
from omni_jax.layers.interpolate import resize_2d  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny SiglipVisionModel with every parameter randomized, saved and imported."""
    torch.manual_seed(0)
    hc = transformers.SiglipVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        image_size=32, patch_size=8, layer_norm_eps=1e-5, vision_use_head=False)
    path = str(tmp_path_factory.mktemp("siglip_vision"))
    model = _randomize_and_save(transformers.SiglipVisionModel(hc), path)
    config, variables = import_siglip_vision(path)
    return model, config, variables


def _pixels(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, h, w, 3)).astype(np.float32)


def _reference(model, pixels: np.ndarray, select: int, post: bool, interpolate: bool) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True,
                    interpolate_pos_encoding=interpolate)
        h = out.hidden_states[select]
        return (model.post_layernorm(h) if post else h).numpy()


def _ours(config, variables, pixels):
    return np.asarray(jax.jit(SiglipVisionEncoder(config).apply)(variables, jnp.asarray(pixels)))


@pytest.mark.parametrize("select,post", [(-1, True), (-1, False), (-2, True), (-2, False)])
def test_native_resolution_matches_hf(hf, select, post):
    model, config, variables = hf
    x = _pixels(32, 32)
    got = _ours(config.replace(select_layer=select, use_post_layernorm=post), variables, x)
    want = _reference(model, x, select, post, interpolate=False)
    assert got.shape == (2, 16, 48)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    if select == -1 and post:  # HF's own output head: last_hidden_state
        with torch.no_grad():
            last = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
        np.testing.assert_allclose(got, last, atol=TOL, rtol=0)


@pytest.mark.parametrize("hw,select,post", [((48, 40), -1, True), ((48, 40), -2, False),
                                            ((16, 24), -1, True)])
def test_interpolated_resolution_matches_hf_bicubic(hf, hw, select, post):
    model, config, variables = hf
    x = _pixels(*hw, seed=1)
    cfg = config.replace(select_layer=select, use_post_layernorm=post)
    got = _ours(cfg, variables, x)
    assert got.shape == (2, cfg.num_patches(*hw), 48)
    np.testing.assert_allclose(got, _reference(model, x, select, post, True), atol=TOL, rtol=0)


def test_native_size_not_multiple_of_patch_matches_hf(tmp_path):
    """so400m-style image_size=384, patch=14: the conv drops the remainder; here 36 / 8."""
    torch.manual_seed(2)
    hc = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=36, patch_size=8, vision_use_head=False)
    model = _randomize_and_save(transformers.SiglipVisionModel(hc), tmp_path)
    config, variables = import_siglip_vision(str(tmp_path))
    assert config.native_grid == 4 and config.grid(36, 36) == (4, 4)
    for hw, interp in [((36, 36), False), ((36, 32), True), ((24, 36), True)]:
        x = _pixels(*hw, seed=5)
        np.testing.assert_allclose(_ours(config, variables, x),
                                   _reference(model, x, -1, True, interp), atol=TOL, rtol=0)
    with pytest.raises(ValueError, match=r"image size 35x36 .*\(or the native image_size=36\)"):
        config.grid(35, 36)


def _randomize_and_save(model, path):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval().save_pretrained(str(path))
    return model


def _bilinear_pos(self, embeddings, height, width):
    """HF's interpolate_pos_encoding with F.interpolate(mode='bilinear') (Ola's resize)."""
    table = self.position_embedding.weight
    g, dim = int(round(table.shape[0] ** 0.5)), table.shape[1]
    grid = table.reshape(1, g, g, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(height // self.patch_size, width // self.patch_size),
                         mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, -1, dim)


def test_bilinear_pos_interp_matches_torch_bilinear(hf):
    model, config, variables = hf
    x = _pixels(40, 56, seed=2)
    original = model.embeddings.interpolate_pos_encoding
    model.embeddings.interpolate_pos_encoding = types.MethodType(_bilinear_pos, model.embeddings)
    try:
        want_emb = _reference(model, x, 0, False, True)
        want = _reference(model, x, -1, True, True)
    finally:
        model.embeddings.interpolate_pos_encoding = original
    bil = config.replace(pos_interp="bilinear")
    np.testing.assert_allclose(_ours(bil.replace(select_layer=0, use_post_layernorm=False),
                                     variables, x), want_emb, atol=TOL, rtol=0)
    np.testing.assert_allclose(_ours(bil, variables, x), want, atol=TOL, rtol=0)
    # the two methods really differ here, so the check above pins down the bilinear path
    assert np.abs(_ours(config, variables, x) - want).max() > 10 * TOL


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_resize_2d_matches_torch(method, align_corners):
    x = np.random.default_rng(3).normal(size=(2, 7, 5, 4)).astype(np.float32)
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2))
    for out_hw in [(14, 11), (3, 2), (9, 3), (7, 5), (1, 1)]:  # up, down, mixed, same, 1x1
        want = F.interpolate(tx, size=out_hw, mode=method, align_corners=align_corners)
        got = resize_2d(jnp.asarray(x), out_hw, method, align_corners)
        assert got.shape == (2, *out_hw, 4) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want.permute(0, 2, 3, 1).numpy(),
                                   atol=1e-5, rtol=0)


def test_resize_2d_bilinear_2x2_reduction_and_jax_difference():
    x = np.random.default_rng(4).normal(size=(1, 8, 8, 3)).astype(np.float32)
    got = np.asarray(resize_2d(jnp.asarray(x), (4, 4), "bilinear"))
    # torch bilinear 2x downsampling without antialias = mean of each 2x2 block
    np.testing.assert_allclose(got, x.reshape(1, 4, 2, 4, 2, 3).mean((2, 4)), atol=1e-6)
    # jax.image.resize antialiases on downsampling: the reason resize_2d exists
    assert np.abs(np.asarray(jax.image.resize(x, (1, 4, 4, 3), "bilinear")) - got).max() > 1e-2


def test_init_tree_matches_checkpoint_and_logical_names(hf):
    _, config, variables = hf
    cfg = config.replace(select_layer=-2, use_post_layernorm=False)
    boxed = jax.eval_shape(SiglipVisionEncoder(cfg).init, jax.random.key(0),
                           jnp.zeros((1, 32, 32, 3)))
    shapes = jax.tree_util.tree_map(lambda a: a.shape, meta.unbox(boxed))
    assert shapes == jax.tree_util.tree_map(lambda a: np.shape(a), variables)
    p = boxed["params"]
    assert p["patch_embed"]["kernel"].names == (None, None, "conv", "embed")  # each name once
    assert p["pos_embed"].names == ("pos", "embed")
    assert p["layers_2"]["attn"]["q"]["kernel"].names == ("embed", "heads", "head_dim")


def test_grid_helper_and_token_count(hf):
    _, config, variables = hf
    assert config.grid(48, 40) == (6, 5) and config.num_patches(48, 40) == 30
    assert SiglipVisionEncoder(config).grid(16, 24) == (2, 3)
    assert config.layers_run == 3 and config.replace(select_layer=-2).layers_run == 2
    with pytest.raises(ValueError, match="multiples of patch_size=8"):
        config.grid(30, 32)


@pytest.mark.parametrize("kw,match", [
    ({"hidden_size": 50, "num_heads": 4}, "hidden_size=50 is not divisible by num_heads=4"),
    ({"image_size": 4}, "image_size=4 is smaller than patch_size=8"),
    ({"select_layer": -4}, r"select_layer=-4 out of range \[-3, 2\]"),
    ({"select_layer": 3}, "select_layer=3 out of range"),
    ({"pos_interp": "nearest"}, "unknown pos_interp 'nearest'"),
    ({"hidden_act": "swish"}, "unknown activation 'swish'"),
    ({"num_layers": 0}, "num_layers must be positive"),
    ({"dtype": "float8"}, "unknown dtype 'float8'"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        SiglipVisionConfig(**kw)


def test_config_from_dict_rejects_unknown_keys():
    assert SiglipVisionConfig.from_dict({"patch_size": 4}).native_grid == 8
    with pytest.raises(ValueError, match=r"unknown keys \['patch'\]"):
        SiglipVisionConfig.from_dict({"patch": 4})


@pytest.mark.parametrize("shape,dtype,match", [
    ((32, 32, 3), np.float32, "rank 3"),
    ((1, 3, 32, 32), np.float32, "looks like NCHW"),
    ((1, 32, 32, 4), np.float32, "must have 3 channels last"),
    ((1, 32, 32, 3), np.uint8, "must be float"),
    ((1, 36, 32, 3), np.float32, "36x32 must be positive multiples of patch_size=8"),
])
def test_encoder_rejects_bad_pixels(hf, shape, dtype, match):
    _, config, variables = hf
    with pytest.raises(ValueError, match=match):
        SiglipVisionEncoder(config).apply(variables, jnp.zeros(shape, dtype))


def test_resize_2d_rejects_bad_args():
    x = jnp.zeros((1, 4, 4, 2))
    with pytest.raises(ValueError, match="unknown resize method 'area'"):
        resize_2d(x, (2, 2), "area")
    with pytest.raises(ValueError, match=r"expects x \[batch, height, width, channels\]"):
        resize_2d(x[0], (2, 2))
    with pytest.raises(ValueError, match="two positive ints"):
        resize_2d(x, (0, 2))
