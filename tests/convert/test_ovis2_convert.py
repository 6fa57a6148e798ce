"""Ovis2ForConditionalGeneration <-> omni_jax (OmniModel with an Ovis2 image tower), fp32.

A random tiny transformers Ovis2 model (all weights perturbed, norms and biases included) is
saved with save_pretrained and imported; the ViT features, visual-word probabilities, VTE
embeddings, indicator rows and the logits of prompts laid out as Ovis2Processor writes them
must match transformers. Export must load back in transformers with identical tensors.
"""

import json
import os
import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax import omni_config
from omni_jax.adapters import registry as adapter_registry
from omni_jax.adapters.ovis2_vte import (
    Ovis2VisualTokenizer,
    Ovis2VTEConfig,
    image_modality,
    placeholder_ids,
)
from omni_jax.convert import io
from omni_jax.convert.ovis2 import config_from_hf, export_ovis2, import_ovis2, params_to_hf
from omni_jax.encoders.ovis2_vision import Ovis2VisionEncoder, Ovis2ViTConfig

os.environ["HF_HUB_OFFLINE"] = "1"
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXT_VOCAB, D, IMG, IND = 64, 16, 58, (59, 60, 61, 62, 63)
CASES = {  # stride 2 / no biases / tied head; stride 1 / qkv + mlp biases / untied head
    "stride2_tied": dict(stride=2, bias=False, tie=True, layers=2),
    "stride1_bias_untied": dict(stride=1, bias=True, tie=False, layers=1),
}


def _hf_config(stride: int, bias: bool, tie: bool, layers: int):
    vc = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
              num_attention_heads=2, image_size=16, patch_size=4, vocab_size=24,
              hidden_stride=stride, qkv_bias=bias, mlp_bias=bias)
    tc = dict(model_type="qwen2", vocab_size=TEXT_VOCAB, hidden_size=D, intermediate_size=32,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return transformers.Ovis2Config(vision_config=vc, text_config=tc, hidden_size=D,
                                    vocab_size=TEXT_VOCAB, image_token_id=IMG,
                                    visual_indicator_token_ids=list(IND),
                                    tie_word_embeddings=tie)


@pytest.fixture(scope="module", params=list(CASES))
def hf(request, tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.Ovis2ForConditionalGeneration(_hf_config(**CASES[request.param])).eval()
    with torch.no_grad():  # every tensor non-trivial, so a wrong mapping cannot hide
        for name, p in model.named_parameters():
            norm = "norm" in name or "layernorm" in name
            p.copy_((1.0 if norm and name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(request.param) / "hf"
    model.save_pretrained(path)
    return model, str(path)


@pytest.fixture(scope="module")
def imported(hf):
    return import_ovis2(hf[1])


@pytest.fixture
def registered():
    """The Ovis2 tower and adapter are registered names (omni_config / adapters.registry)."""
    assert omni_config.ENCODERS["ovis2_vision"][1:3] == ("Ovis2ViTConfig", "Ovis2VisionEncoder")
    assert adapter_registry.ADAPTERS["ovis2_vte"][:2] == (Ovis2VTEConfig, Ovis2VisualTokenizer)


def _pixels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 16, 16)).astype(np.float32)  # NCHW


def _processor_ids(num_atoms: int, grid: tuple[int, int]) -> list[int]:
    """The placeholder Ovis2Processor writes, tokenized with the tiny model's ids."""
    fake = types.SimpleNamespace(image_seq_length=num_atoms)
    text = transformers.Ovis2Processor.replace_image_token(
        fake, {"grids": np.array([grid])}, 0)
    ids = {"ATOM": IMG, **dict(zip(("START", "GRID", "COL", "ROW", "END"), IND))}
    tokens = re.findall(r"<IMG_([A-Z]+)>", text)
    assert "".join(f"<IMG_{t}>" for t in tokens) == text
    return [ids[t] for t in tokens]


def test_config_maps_every_setting(hf, imported):
    model, _ = hf
    config, params = imported
    vit, vte = config["image"]["encoder_config"], config["image"]["adapter_config"]
    vc = model.config.vision_config
    assert (vit["num_layers"], vit["qkv_bias"], vit["mlp_bias"]) == (
        vc.num_hidden_layers, vc.qkv_bias, vc.mlp_bias)
    assert (vte["hidden_stride"], vte["vocab_size"], vte["out_dim"]) == (vc.hidden_stride, 24, D)
    assert vte["image_token_id"] == IMG and tuple(vte["indicator_token_ids"]) == IND
    assert config["llm"]["tie_word_embeddings"] == model.config.tie_word_embeddings
    assert ("lm_head" in params["params"]["llm"]) != model.config.tie_word_embeddings
    assert set(params["params"]) == {"llm", "image_encoder", "image_adapter"}


def test_visual_tokens_and_embeddings_match(hf, imported):
    model, _ = hf
    config, params = imported
    p = params["params"]
    vit = Ovis2ViTConfig.from_dict(config["image"]["encoder_config"])
    vte = Ovis2VTEConfig.from_dict(config["image"]["adapter_config"])
    px = _pixels(2, 1)
    with torch.no_grad():
        t = torch.from_numpy(px)
        feats_ref = model.model.vision_tower.transformer(t).last_hidden_state.numpy()
        probs_ref = model.model.vision_tower(t).pooler_output.numpy()
        io_ref = model.model.get_image_features(t)
        emb_ref = io_ref.pooler_output.numpy()
        ind_ref = io_ref.visual_indicator_features.numpy()
    feats = Ovis2VisionEncoder(vit).apply({"params": p["image_encoder"]},
                                          jnp.asarray(px.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(feats), feats_ref, atol=1e-5)  # measured 2.6e-6
    grid = vit.grid(16, 16)
    tok = Ovis2VisualTokenizer(vte)
    av = {"params": p["image_adapter"]}
    probs = np.asarray(tok.apply(av, feats, grid, method=Ovis2VisualTokenizer.probabilities))
    n = tok.num_tokens(*grid) - 3
    assert probs.shape == (2, n, 24) and n == 16 // vte.hidden_stride ** 2
    np.testing.assert_allclose(probs[..., :19], probs_ref, atol=2e-6)  # measured 3e-7
    np.testing.assert_array_equal(probs[..., 19:], 0.0)
    out = np.asarray(tok.apply(av, feats, grid))  # [2, START + n + GRID + END, D]
    np.testing.assert_allclose(out[:, 1:-2], emb_ref, atol=2e-6)  # measured 1.5e-7
    for pos, i in ((0, 0), (-2, 1), (-1, 4)):  # START, GRID, END rows
        np.testing.assert_allclose(out[:, pos], np.broadcast_to(ind_ref[i], (2, D)), atol=1e-6)


def test_placeholder_ids_match_processor():
    for grid in ((1, 1), (2, 3), (3, 1)):
        assert placeholder_ids(4, grid, IMG, IND) == _processor_ids(4, grid)
    with pytest.raises(ValueError, match="positive"):
        placeholder_ids(4, (0, 1), IMG, IND)


def test_prompt_logits_match(hf, imported, registered):
    from omni_jax.model import OmniModel, check_batch

    model, _ = hf
    config, params = imported
    omni = omni_config.OmniConfig.from_dict(config)
    vte = omni.image.adapter_config
    n_atoms = 16 // vte.hidden_stride ** 2
    image = _processor_ids(n_atoms, (1, 1))
    rng = np.random.default_rng(2)
    text = lambda k: list(rng.integers(0, IMG, k))  # noqa: E731  (no special ids)
    rows = [text(3) + image + text(5), text(6) + image + text(2)]  # one image per prompt
    ids = np.array(rows, np.int64)
    px = _pixels(2, 3)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(px)).logits
    batch = {"input_ids": jnp.asarray(ids, jnp.int32),
             "modality": jnp.asarray(image_modality(ids, vte)),
             "image": jnp.asarray(px.transpose(0, 2, 3, 1))}
    check_batch(omni, batch)
    fresh = jax.eval_shape(OmniModel(omni).init, jax.random.key(0), batch)  # same tree as init
    want = jax.tree.map(lambda a: (a.shape, str(a.dtype)), nn.meta.unbox(fresh))
    assert jax.tree.map(lambda a: (a.shape, str(a.dtype)), params) == want
    logits = np.asarray(jax.jit(OmniModel(omni).apply)(params, batch)["logits"])
    assert logits.shape == tuple(ref.shape)
    np.testing.assert_allclose(logits, ref.numpy(), atol=3e-5)  # measured 3.3e-6 (|logit| <= 4.6)


def test_export_round_trip(hf, imported, tmp_path):
    model, src = hf
    config, params = imported
    base = io.read_config(src)
    for out, shard in ((tmp_path / "one", io.MAX_SHARD_BYTES), (tmp_path / "sharded", 20_000)):
        export_ovis2(config, params, str(out), base_config=base, max_shard_bytes=shard)
        back = transformers.Ovis2ForConditionalGeneration.from_pretrained(str(out)).eval()
        want, got = model.state_dict(), back.state_dict()
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k
        config2, params2 = import_ovis2(str(out))  # sharded index read too
        assert config2 == config
        jax.tree.map(np.testing.assert_array_equal, params2, params)
    assert (tmp_path / "sharded" / io.INDEX_NAME).exists()
    tensors = params_to_hf(config, params)
    assert set(tensors) == set(io.read_tensors(src))


def _edit_config(src: str, dst, **changes) -> str:
    hf = io.read_config(src)
    for key, value in changes.items():
        node = hf
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps(hf))
    os.symlink(os.path.join(src, io.WEIGHTS_NAME), dst / io.WEIGHTS_NAME)
    return str(dst)


def test_bad_inputs_raise(hf, imported, tmp_path):
    model, src = hf
    config, params = imported
    qwen = tmp_path / "qwen"
    model.model.language_model.config.save_pretrained(qwen)
    with pytest.raises(ValueError, match="not an Ovis2 checkpoint: model_type 'qwen2'"):
        import_ovis2(str(qwen))
    with pytest.raises(ValueError, match="no config.json"):
        import_ovis2(str(tmp_path))
    bad = {"list_size": ({"vision_config.image_size": [16, 16]}, "image_size must be one int"),
           "indicators": ({"vision_config.num_visual_indicator_tokens": 4},
                          "num_visual_indicator_tokens must be 5"),
           "act": ({"vision_config.hidden_act": "quick_gelu"}, "unknown activation"),
           "tokenize": ({"vision_config.tokenize_function": "argmax"}, "tokenize_function"),
           "sliding": ({"text_config.use_sliding_window": True}, "sliding-window"),
           "untied_vocab": ({"tie_word_embeddings": False, "vocab_size": 60},
                            "untied lm_head with vocab_size=60"),
           "token_id": ({"image_token_id": 64}, "outside the text vocabulary"),
           "width": ({"hidden_size": 8}, "must equal text_config.hidden_size")}
    for name, (changes, msg) in bad.items():
        with pytest.raises(ValueError, match=msg):
            import_ovis2(_edit_config(src, tmp_path / name, **changes))
    wrong = tmp_path / "wrong"  # a wrong-shape head and a missing VTE
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps(io.read_config(src)))
    tensors = dict(io.read_tensors(src))
    tensors["model.vision_tower.head_linear.weight"] = np.zeros((19, 8), np.float32)
    del tensors["model.visual_embeddings_table.weight"]
    io.save_safetensors(tensors, str(wrong / io.WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"missing keys \['model.visual_embeddings_table.weight'"
                                         r"\].*head_linear.weight: expected \(19, \d+\), got"):
        import_ovis2(str(wrong))
    p = {"params": {k: v for k, v in params["params"].items() if k != "image_adapter"}}
    with pytest.raises(ValueError, match=r"params lack \['image_adapter'\]"):
        export_ovis2(config, p, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="not an Ovis2 model config"):
        params_to_hf({**config, "image": {**config["image"], "adapter": "ovis_vte"}}, params)
    vit = Ovis2ViTConfig.from_dict(config["image"]["encoder_config"])
    enc_params = {"params": params["params"]["image_encoder"]}
    with pytest.raises(ValueError, match="must be the native 16x16"):
        Ovis2VisionEncoder(vit).apply(enc_params, jnp.zeros((1, 20, 20, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        Ovis2VisionEncoder(vit).apply(enc_params, jnp.zeros((1, 3, 16, 16)))
    with pytest.raises(ValueError, match="indicator_token_ids must be 5 distinct"):
        Ovis2VTEConfig(indicator_token_ids=(1, 2, 3, 4, 4))
    assert config_from_hf(io.read_config(src), scan_layers=True)["llm"]["scan_layers"]


def test_cli_round_trip_through_a_native_checkpoint(hf, tmp_path):
    """convert import-hf / export-hf detect Ovis2 directories (kind ovis2, a whole model)."""
    from omni_jax.cli import convert

    src = hf[1]
    assert convert.main(["import-hf", src, str(tmp_path / "native")]) == 0
    assert convert.main(["export-hf", str(tmp_path / "native"), str(tmp_path / "out")]) == 0
    import transformers

    a = transformers.Ovis2ForConditionalGeneration.from_pretrained(src).state_dict()
    b = transformers.Ovis2ForConditionalGeneration.from_pretrained(tmp_path / "out").state_dict()
    assert sorted(a) == sorted(b) and all(bool((a[k] == b[k]).all()) for k in a)
