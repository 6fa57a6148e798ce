"""unilm BEATs checkpoint files: import vs the torch reference, export round trip, CLI, errors."""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "encoders"))
from beats_torch_ref import BEATsRef, randomize  # noqa: E402

from omni_jax.cli import convert as cli  # noqa: E402
from omni_jax.convert.beats import export_beats, import_beats, load_native_beats  # noqa: E402
from omni_jax.encoders.beats import BEATsEncoder  # noqa: E402

# a tiny released-style cfg (fine-tuned: carries a predictor head and training-only keys)
CFG = dict(input_patch_size=16, embed_dim=24, conv_bias=False, encoder_layers=2,
           encoder_embed_dim=32, encoder_ffn_embed_dim=48, encoder_attention_heads=4,
           activation_fn="gelu", layer_norm_first=False, deep_norm=True, conv_pos=8,
           conv_pos_groups=4, relative_position_embedding=True, num_buckets=16, max_distance=20,
           gru_rel_pos=True, dropout=0.0, attention_dropout=0.0, encoder_layerdrop=0.05,
           layer_wise_gradient_decay_ratio=0.6, finetuned_model=True, predictor_class=5)


def save(path, cfg=CFG, model=None, **extra):
    ref = randomize(BEATsRef(cfg), seed=2)
    sd = ref.state_dict() if model is None else model
    torch.save({"cfg": cfg, "model": sd, **extra}, path)
    return ref


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    path = tmp_path_factory.mktemp("beats") / "BEATs_tiny.pt"
    ref = save(path, label_dict={"0": "/m/09x0r", "1": "/m/05zppz"})
    config, params = import_beats(path)
    return path, ref, config, params


def flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: v})
    return out


def test_import_matches_reference(released):
    path, ref, config, params = released
    assert (config.patch_size, config.embed_dim, config.encoder_embed_dim) == (16, 24, 32)
    assert config.deep_norm and config.gru_rel_pos and not config.layer_norm_first
    wave = np.random.default_rng(0).normal(size=(2, 6789)).astype(np.float32) * 0.1
    with torch.no_grad():
        fb = ref.preprocess(torch.from_numpy(wave))
        want, _ = ref(torch.from_numpy(wave))
    got, _ = jax.jit(BEATsEncoder(config).apply)(params, fbank=jnp.asarray(fb.numpy()))
    assert got.shape == want.shape == (2, 16, 32)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=5e-6, rtol=0)  # meas. 9.5e-7


def test_parametrize_naming_imports_the_same(released, tmp_path):
    path, ref, _, params = released
    sd = ref.state_dict()
    wn = "encoder.pos_conv.0."
    sd[wn + "parametrizations.weight.original0"] = sd.pop(wn + "weight_g")
    sd[wn + "parametrizations.weight.original1"] = sd.pop(wn + "weight_v")
    save(tmp_path / "p.pt", model=sd)
    _, p2 = import_beats(tmp_path / "p.pt")
    a, b = flat(params), flat(p2)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    real = BEATsRef(CFG, parametrized_weight_norm=True)  # torch's own parametrize names
    assert {wn + "parametrizations.weight.original0",
            wn + "parametrizations.weight.original1"} <= set(real.state_dict())


def test_export_round_trip_and_unilm_loads_it(released, tmp_path):
    path, ref, config, params = released
    out = tmp_path / "exported.pt"
    export_beats(config, params, out)
    src = torch.load(path, weights_only=True)["model"]
    got = torch.load(out, weights_only=True)
    features = {k: v for k, v in src.items() if not k.startswith("predictor.")}
    assert got["model"].keys() == features.keys()
    for k, v in features.items():
        assert torch.equal(got["model"][k], v), k
    config2, params2 = import_beats(out)
    assert config2 == config
    a, b = flat(params), flat(params2)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    torch_model = BEATsRef(got["cfg"])  # unilm-style construction from the exported cfg
    torch_model.load_state_dict(got["model"], strict=True)


def test_cli_import_beats(released, tmp_path):
    path, _, config, params = released
    assert cli.main(["import-beats", str(path), str(tmp_path / "native")]) == 0
    config2, params2 = load_native_beats(str(tmp_path / "native"))
    assert config2 == config
    a, b = flat(params), flat(params2)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    assert cli.main(["import-beats", str(tmp_path / "none.pt"), str(tmp_path / "x")]) == 2


def test_bad_files(released, tmp_path):
    path, ref, _, _ = released
    sd = ref.state_dict()
    torch.save({"cfg": CFG}, tmp_path / "nomodel.pt")
    with pytest.raises(ValueError, match="expected a dict with 'cfg'.*missing \\['model'\\]"):
        import_beats(tmp_path / "nomodel.pt")
    torch.save(sd, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="missing \\['cfg', 'model'\\]"):
        import_beats(tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="does not exist"):
        import_beats(tmp_path / "absent.pt")
    for bad, match in [({"activation_fn": "glu"}, "activation_fn='glu' is not supported"),
                       ({"input_patch_size": -1}, "input_patch_size=-1 is not supported"),
                       ({"deep_norm": "yes"}, "deep_norm='yes' is not supported"),
                       ({"encoder_attention_heads": 5}, "encoder_attention_heads=5 must divide"),
                       ({"layer_norm_first": True}, "deep_norm needs post-LN")]:
        torch.save({"cfg": {**CFG, **bad}, "model": sd}, tmp_path / "cfg.pt")
        with pytest.raises(ValueError, match=match):
            import_beats(tmp_path / "cfg.pt")
    torch.save({"cfg": {**CFG, "encoder_ffn_embed_dim": 64}, "model": sd}, tmp_path / "s.pt")
    with pytest.raises(ValueError, match="wrong shapes \\[encoder.layers.0.fc1.bias: expected "
                                         "\\(64,\\), got \\(48,\\)"):
        import_beats(tmp_path / "s.pt")
    wrong = dict(sd)
    wrong["encoder.pos_conv.0.weight_g"] = torch.zeros(1, 1, 7)
    del wrong["encoder.layers.1.fc2.bias"]
    torch.save({"cfg": CFG, "model": wrong}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="missing keys \\['encoder.layers.1.fc2.bias'\\].*"
                                         "weight_g: expected \\(1, 1, 8\\), got \\(1, 1, 7\\)"):
        import_beats(tmp_path / "w.pt")
    split = dict(sd)
    split["encoder.layers.1.self_attn.relative_attention_bias.weight"] = torch.zeros(16, 4)
    torch.save({"cfg": CFG, "model": split}, tmp_path / "t.pt")
    with pytest.raises(ValueError, match="shared by all layers"):
        import_beats(tmp_path / "t.pt")


def test_released_iter3_cfg_shapes():
    """The released cfg (SEEDS.md): every state-dict tensor maps onto the module's param of the
    same size, nothing left over, and 30 s give 1496 x 768 features (shapes only, no compute)."""
    from omni_jax.convert.beats import _rules, config_from_unilm

    released = dict(input_patch_size=16, embed_dim=512, conv_bias=False, encoder_layers=12,
                    encoder_embed_dim=768, encoder_ffn_embed_dim=3072,
                    encoder_attention_heads=12, activation_fn="gelu", layer_norm_first=False,
                    deep_norm=True, conv_pos=128, conv_pos_groups=16,
                    relative_position_embedding=True, num_buckets=320, max_distance=800,
                    gru_rel_pos=True)
    config = config_from_unilm(released)
    enc = BEATsEncoder(config)
    wave = jax.ShapeDtypeStruct((1, 480000), jnp.float32)
    shapes = nn.meta.unbox(jax.eval_shape(enc.init, jax.random.key(0), wave))
    ours = {k: tuple(v.shape) for k, v in flat(shapes["params"]).items()}
    mapped = {}
    for _key, path, to_ours, _, shape in _rules(config):
        mapped["/".join(path)] = to_ours(np.broadcast_to(np.float32(0), shape)).shape
    assert mapped == ours
    out, valid = jax.eval_shape(enc.apply, shapes, wave)
    assert out.shape == (1, 1496, 768) and valid.shape == (1, 1496)
