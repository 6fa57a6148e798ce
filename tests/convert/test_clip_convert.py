"""CLIP vision tower: HF CLIPVisionModel dir -> import -> our encoder equals transformers'
hidden states (any layer, [CLS] dropped or kept, interpolated grids); export -> reload is
lossless; CLIPModel dirs import their vision tower; bad directories raise ValueError."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax.core import meta  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from omni_jax.convert.clip import config_from_hf, export_clip_vision, import_clip_vision  # noqa: E402,E501
from omni_jax.encoders.vision import SiglipVisionConfig, SiglipVisionEncoder  # noqa: E402

TOL = 1e-5
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=32, patch_size=8)  # 4x4 grid + [CLS]


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    model = _randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)))
    path = str(tmp_path_factory.mktemp("clip_vision"))
    model.save_pretrained(path)
    return model, path


def _pixels(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, h, w, 3)).astype(np.float32)


def _reference(model, x: np.ndarray, select: int, interpolate: bool = False) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), output_hidden_states=True,
                    interpolate_pos_encoding=interpolate)
    return out.hidden_states[select].numpy()  # [batch, 1 + patches, hidden]


def _ours(config, variables, x: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(SiglipVisionEncoder(config).apply)(variables, jnp.asarray(x)))


@pytest.mark.parametrize("select,feature", [(-1, "cls_patch"), (-2, "patch"), (-2, "cls_patch"),
                                            (0, "patch"), (1, "patch")])
def test_hidden_states_match_hf(hf, select, feature):
    model, path = hf
    config, variables = import_clip_vision(path, select_layer=select, feature=feature)
    x = _pixels(32, 32)
    got, want = _ours(config, variables, x), _reference(model, x, select)
    if feature == "patch":
        want = want[:, 1:]
    assert got.shape == (2, config.num_tokens(32, 32), 32) == want.shape
    err = np.abs(got - want).max()
    assert err < TOL, err
    if select == -1:  # HF's own output: last_hidden_state (not post-normed for CLIP)
        with torch.no_grad():
            last = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
        np.testing.assert_allclose(got, last, atol=TOL, rtol=0)


@pytest.mark.parametrize("hw", [(48, 40), (16, 24)])
def test_interpolated_grid_keeps_class_position(hf, hw):
    model, path = hf
    config, variables = import_clip_vision(path, select_layer=-2, feature="cls_patch")
    x = _pixels(*hw, seed=1)
    got, want = _ours(config, variables, x), _reference(model, x, -2, interpolate=True)
    assert got.shape == (2, 1 + config.num_patches(*hw), 32)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # resizing the [CLS] row together with the grid would be wrong: the check above can fail
    pos = variables["params"]["pos_embed"]
    g = config.native_grid
    wrong = {"params": {**variables["params"], "pos_embed": np.concatenate(
        [pos[1:2], pos[1:]]).reshape(1 + g * g, -1)}}
    assert np.abs(_ours(config, wrong, x) - want).max() > 100 * TOL


def test_init_tree_matches_import(hf):
    _, path = hf
    config, variables = import_clip_vision(path, select_layer=-2)
    boxed = jax.eval_shape(SiglipVisionEncoder(config).init, jax.random.key(0),
                           jnp.zeros((1, 32, 32, 3)))
    shapes = jax.tree_util.tree_map(lambda a: a.shape, meta.unbox(boxed))
    assert shapes == jax.tree_util.tree_map(np.shape, variables)
    p = variables["params"]
    assert "bias" not in p["patch_embed"] and p["pos_embed"].shape == (17, 32)
    assert p["class_embed"].shape == (32,) and set(p["pre_norm"]) == {"scale", "bias"}
    assert config.hidden_act == "quick_gelu" and not config.use_post_layernorm


def test_export_round_trip(hf, tmp_path):
    model, path = hf
    config, variables = import_clip_vision(path)
    out = str(tmp_path / "out")
    export_clip_vision(config, variables, out)
    back, info = transformers.CLIPVisionModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    want, got = model.state_dict(), back.state_dict()
    assert sorted(want) == sorted(got)
    bad = [k for k in want if not torch.equal(want[k], got[k])]
    assert not bad, f"tensors changed: {bad}"
    again = import_clip_vision(out)
    assert again[0] == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, again[1], variables)


def test_full_clip_model_dir_imports_vision_tower(tmp_path):
    hc = transformers.CLIPConfig(
        vision_config=VISION, projection_dim=16,
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=50, max_position_embeddings=8))
    full = _randomize(transformers.CLIPModel(hc), seed=3)
    full.save_pretrained(str(tmp_path))
    config, variables = import_clip_vision(str(tmp_path), select_layer=-2)
    x = _pixels(32, 32, seed=4)
    with torch.no_grad():
        out = full.vision_model(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                                output_hidden_states=True)
    np.testing.assert_allclose(_ours(config, variables, x), out.hidden_states[-2][:, 1:].numpy(),
                               atol=TOL, rtol=0)


def _copy_dir(src: str, dst, edit_config=None, edit_tensors=None) -> str:
    dst.mkdir()
    tensors = load_file(os.path.join(src, "model.safetensors"))
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    (dst / "config.json").write_text(json.dumps(edit_config(cfg) if edit_config else cfg))
    return str(dst)


def test_bad_inputs(hf, tmp_path):
    _, path = hf
    siglip = str(tmp_path / "siglip")
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)).save_pretrained(
        siglip)
    with pytest.raises(ValueError, match="not a CLIP checkpoint: model_type 'siglip_vision"):
        import_clip_vision(siglip)
    with pytest.raises(ValueError, match="no config.json"):
        import_clip_vision(str(tmp_path / "nowhere"))
    deeper = _copy_dir(path, tmp_path / "deeper",
                       edit_config=lambda c: {**c, "num_hidden_layers": 4, "hidden_size": 40})
    with pytest.raises(ValueError) as e:
        import_clip_vision(deeper)
    msg = str(e.value)
    assert "missing keys ['encoder.layers.3." in msg
    assert "embeddings.class_embedding: expected (40,), got (32,)" in msg

    def edit(t):  # transformers 5 saves CLIPVisionModel keys without "vision_model."
        pre = "vision_model." if "vision_model.pre_layrnorm.bias" in t else ""
        del t[pre + "pre_layrnorm.bias"]
        t[pre + "embeddings.patch_embedding.bias"] = np.zeros(32, np.float32)

    with pytest.raises(ValueError, match=r"missing keys \['pre_layrnorm.bias'\], unexpected "
                                         r"keys \['embeddings.patch_embedding.bias'\]"):
        import_clip_vision(_copy_dir(path, tmp_path / "edited", edit_tensors=edit))
    with pytest.raises(ValueError, match="cannot override \\['class_token'\\]"):
        import_clip_vision(path, class_token=False)
    with pytest.raises(ValueError, match="not a CLIP-shaped vision config"):
        export_clip_vision(SiglipVisionConfig(), {}, str(tmp_path / "x"))
    config, variables = import_clip_vision(path)
    del variables["params"]["pre_norm"]
    with pytest.raises(ValueError, match="missing keys \\['pre_norm/bias', 'pre_norm/scale'\\]"):
        export_clip_vision(config, variables, str(tmp_path / "y"))


def test_config_defaults_and_feature_validation():
    c = config_from_hf({"model_type": "clip_vision_model"})
    assert (c.patch_size, c.hidden_act, c.layer_norm_eps, c.num_positions) == (
        32, "quick_gelu", 1e-5, 50)
    with pytest.raises(ValueError, match="unknown feature 'cls'"):
        c.replace(feature="cls")
    with pytest.raises(ValueError, match="feature='cls_patch' needs class_token=True"):
        SiglipVisionConfig(feature="cls_patch")
    with pytest.raises(ValueError, match="unknown activation 'swish'.*quick_gelu"):
        SiglipVisionConfig(hidden_act="swish")


def test_pytorch_bin_only_dir(hf, tmp_path):
    """Hub CLIP repos may hold only pytorch_model.bin: read with torch.load(weights_only)."""
    model, path = hf
    d = tmp_path / "bin"
    d.mkdir()
    torch.save({"vision_model." + k: v for k, v in model.state_dict().items()},
               str(d / "pytorch_model.bin"))
    with open(os.path.join(path, "config.json")) as f:
        (d / "config.json").write_text(f.read())
    config, variables = import_clip_vision(str(d))
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, import_clip_vision(path)[1])
    (d / "pytorch_model.bin").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read torch state dict"):
        import_clip_vision(str(d))
