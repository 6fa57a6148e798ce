"""SigLIP vision checkpoints: HF dir -> import -> export -> HF reload is lossless; SiglipModel
dirs import their vision tower; mismatched checkpoints are reported key by key."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from omni_jax.convert.siglip import (  # noqa: E402
    HF_DEFAULTS,
    config_from_hf,
    export_siglip_vision,
    import_siglip_vision,
)
from omni_jax.encoders.vision import SiglipVisionEncoder  # noqa: E402

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _save(model, path) -> str:
    model.save_pretrained(str(path))
    return str(path)


def _assert_same_tensors(want: dict, got: dict) -> None:
    assert sorted(want) == sorted(got)
    bad = [k for k in want if not torch.equal(want[k], got[k])]
    assert not bad, f"tensors changed: {bad}"


@pytest.mark.parametrize("use_head", [False, True])
def test_round_trip_vision_model(tmp_path, use_head):
    hc = transformers.SiglipVisionConfig(**VISION, vision_use_head=use_head)
    model = _randomize(transformers.SiglipVisionModel(hc))
    config, variables = import_siglip_vision(_save(model, tmp_path / "hf"))
    assert (config.hidden_size, config.num_layers, config.num_heads) == (32, 2, 4)
    export_siglip_vision(config, variables, str(tmp_path / "out"))
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["vision_use_head"] is False
    back, info = transformers.SiglipVisionModel.from_pretrained(
        str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # the pooling head is not kept (documented); every other tensor is bit-identical
    want = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert len(want) == len(model.state_dict()) - (11 if use_head else 0)
    _assert_same_tensors(want, back.state_dict())


def test_import_from_siglip_model_dir(tmp_path):
    sc = transformers.SiglipConfig(
        vision_config=VISION, text_config=dict(hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4,
                                               vocab_size=64, max_position_embeddings=16))
    model = _randomize(transformers.SiglipModel(sc))
    config, variables = import_siglip_vision(_save(model, tmp_path / "hf"), select_layer=-2)
    assert config.select_layer == -2 and config.patch_size == 8
    export_siglip_vision(config, variables, str(tmp_path / "out"))
    back = transformers.SiglipVisionModel.from_pretrained(str(tmp_path / "out"))
    want = {k: v for k, v in model.vision_model.state_dict().items() if not k.startswith("head.")}
    _assert_same_tensors(want, back.state_dict())
    x = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model.vision_model(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                                 output_hidden_states=True).hidden_states[-2].numpy()
    got = SiglipVisionEncoder(config.replace(use_post_layernorm=False)).apply(
        variables, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=0)


def test_hf_defaults_match_transformers():
    ref = transformers.SiglipVisionConfig()
    assert {k: getattr(ref, k) for k in HF_DEFAULTS} == HF_DEFAULTS
    # hub configs omit default-valued keys
    c = config_from_hf({"model_type": "siglip_vision_model", "hidden_size": 1152,
                        "num_attention_heads": 16, "patch_size": 14, "image_size": 384})
    assert (c.hidden_size, c.num_layers, c.intermediate_size, c.native_grid) == (1152, 12, 3072, 27)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION))
    return _save(model, tmp_path_factory.mktemp("siglip_ok"))


def _corrupt(src: str, dst, edit) -> str:
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return str(dst)


def test_import_lists_missing_unexpected_and_wrong_shape(saved, tmp_path):
    def edit(t):
        del t["encoder.layers.1.mlp.fc2.bias"]
        t["encoder.layers.2.mlp.fc1.weight"] = np.zeros((64, 32), np.float32)
        t["embeddings.position_embedding.weight"] = np.zeros((25, 32), np.float32)
    with pytest.raises(ValueError) as e:
        import_siglip_vision(_corrupt(saved, tmp_path / "bad", edit))
    msg = str(e.value)
    assert "missing keys ['encoder.layers.1.mlp.fc2.bias']" in msg
    assert "unexpected keys ['encoder.layers.2.mlp.fc1.weight']" in msg
    assert "embeddings.position_embedding.weight: expected (16, 32), got (25, 32)" in msg


def test_import_ignores_text_tower_and_head_keys(saved, tmp_path):
    def edit(t):
        t["text_model.final_layer_norm.weight"] = np.ones(4, np.float32)
        t["logit_scale"] = np.ones(1, np.float32)
    _, variables = import_siglip_vision(_corrupt(saved, tmp_path / "extra", edit))
    assert variables["params"]["pos_embed"].shape == (16, 32)


def test_import_rejects_other_models(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "clip_vision_model"}, f)
    with pytest.raises(ValueError, match="not a SigLIP checkpoint: model_type 'clip_vision_model'"):
        import_siglip_vision(str(tmp_path))
    with pytest.raises(ValueError, match="no config.json"):
        import_siglip_vision(str(tmp_path / "nowhere"))


def test_export_rejects_mismatched_params(saved, tmp_path):
    config, variables = import_siglip_vision(saved)
    params = dict(variables["params"])
    del params["post_norm"]
    params["pos_embed"] = np.zeros((9, 32), np.float32)
    with pytest.raises(ValueError, match=r"missing keys \['post_norm/bias', 'post_norm/scale'\]"
                                         r".*pos_embed: expected \(16, 32\), got \(9, 32\)"):
        export_siglip_vision(config, {"params": params}, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
