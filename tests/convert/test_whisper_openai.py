"""OpenAI Whisper `.pt` import: a file written (OpenAI key names and layout) from a random tiny
transformers WhisperModel imports to the HF importer's tree and runs like HF's WhisperEncoder;
a missing positional buffer is recomputed; wrong sizes and malformed files raise ValueError."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import WhisperConfig, WhisperModel  # noqa: E402

from omni_jax.convert.whisper import import_whisper_encoder  # noqa: E402
from omni_jax.convert.whisper_openai import import_whisper_pt, openai_to_hf_key  # noqa: E402
from omni_jax.encoders.audio import WhisperEncoder, sinusoids  # noqa: E402

TOL = 1e-5
D, LAYERS, HEADS, CTX = 16, 2, 2, 8
# transformers -> OpenAI renames (the inverse of what the importer undoes), encoder and decoder
_TO_OPENAI = (("layers.", "blocks."), (".self_attn.q_proj.", ".attn.query."),
              (".self_attn.k_proj.", ".attn.key."), (".self_attn.v_proj.", ".attn.value."),
              (".self_attn.out_proj.", ".attn.out."), (".self_attn_layer_norm.", ".attn_ln."),
              (".encoder_attn.", ".cross_attn."), (".encoder_attn_layer_norm.", ".cross_attn_ln."),
              (".fc1.", ".mlp.0."), (".fc2.", ".mlp.2."), (".final_layer_norm.", ".mlp_ln."),
              ("encoder.layer_norm.", "encoder.ln_post."), ("decoder.layer_norm.", "decoder.ln."),
              ("encoder.embed_positions.weight", "encoder.positional_embedding"),
              ("decoder.embed_positions.weight", "decoder.positional_embedding"),
              ("decoder.embed_tokens.", "decoder.token_embedding."))


def _hf_config(mels: int = 80) -> WhisperConfig:
    return WhisperConfig(vocab_size=64, num_mel_bins=mels, d_model=D, encoder_layers=LAYERS,
                         encoder_attention_heads=HEADS, encoder_ffn_dim=4 * D, decoder_layers=1,
                         decoder_attention_heads=HEADS, decoder_ffn_dim=4 * D,
                         max_source_positions=CTX, max_target_positions=CTX, pad_token_id=0,
                         bos_token_id=0, eos_token_id=0, decoder_start_token_id=0,
                         begin_suppress_tokens=None)


def _dims(mels: int = 80) -> dict[str, int]:
    return dict(n_mels=mels, n_audio_ctx=CTX, n_audio_state=D, n_audio_head=HEADS,
                n_audio_layer=LAYERS, n_vocab=64, n_text_ctx=CTX, n_text_state=D,
                n_text_head=HEADS, n_text_layer=1)


def to_openai(model: WhisperModel) -> dict[str, torch.Tensor]:
    """WhisperModel state dict -> OpenAI's names (OpenAI's `key` Linear has no bias anyway)."""
    out = {}
    for k, v in model.state_dict().items():
        for old, new in _TO_OPENAI:
            k = k.replace(old, new)
        out[k] = v.clone()
    return out


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    torch.manual_seed(0)
    model = WhisperModel(_hf_config(128))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    d = tmp_path_factory.mktemp("whisper")
    model.save_pretrained(str(d / "hf"))
    pt = str(d / "tiny.pt")
    torch.save({"dims": _dims(128), "model_state_dict": to_openai(model)}, pt)
    return model, pt, str(d / "hf")


def _run(config, variables, mel: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(WhisperEncoder(config).apply)(variables, jnp.asarray(mel)))


def _reference(model: WhisperModel, mel: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.encoder(torch.from_numpy(mel)).last_hidden_state.numpy()


def test_key_renames():
    assert openai_to_hf_key("blocks.3.attn.query.weight") == "layers.3.self_attn.q_proj.weight"
    assert openai_to_hf_key("blocks.0.mlp.2.bias") == "layers.0.fc2.bias"
    assert openai_to_hf_key("blocks.1.mlp_ln.weight") == "layers.1.final_layer_norm.weight"
    assert openai_to_hf_key("ln_post.bias") == "layer_norm.bias"
    assert openai_to_hf_key("conv2.weight") == "conv2.weight"


def test_matches_hf_encoder_and_hf_importer(hf):
    model, pt, hf_dir = hf
    assert "encoder.blocks.0.attn.key.weight" in torch.load(pt, weights_only=True)[
        "model_state_dict"]
    config, variables = import_whisper_pt(pt)
    hf_config, hf_vars = import_whisper_encoder(hf_dir)
    assert config == hf_config
    assert jax.tree.structure(variables) == jax.tree.structure(hf_vars)
    jax.tree.map(np.testing.assert_array_equal, variables, hf_vars)
    mel = np.random.default_rng(0).normal(size=(2, 128, 2 * CTX)).astype(np.float32)
    got, want = _run(config, variables, mel), _reference(model, mel)
    assert got.shape == (2, CTX, D)
    err = np.abs(got - want).max()
    assert err < TOL, err


def test_missing_positional_buffer_is_recomputed(tmp_path):
    torch.manual_seed(1)
    model = WhisperModel(_hf_config(80)).eval()
    with torch.no_grad():
        for p in model.encoder.layers.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.encoder.embed_positions.weight.copy_(torch.from_numpy(sinusoids(CTX, D)))
    state = to_openai(model)
    del state["encoder.positional_embedding"]
    pt = str(tmp_path / "nopos.pt")
    torch.save({"dims": _dims(80), "model_state_dict": state}, pt)
    config, variables = import_whisper_pt(pt)
    np.testing.assert_array_equal(variables["params"]["embed_positions"], sinusoids(CTX, D))
    mel = np.random.default_rng(1).normal(size=(1, 80, 2 * CTX)).astype(np.float32)
    np.testing.assert_allclose(_run(config, variables, mel), _reference(model, mel),
                               atol=TOL, rtol=0)


def test_expect_config(hf):
    _, pt, _ = hf
    config, _ = import_whisper_pt(pt)
    same, variables = import_whisper_pt(pt, expect=config.replace(dtype="bfloat16",
                                                                  param_dtype="bfloat16"))
    assert same.param_dtype == "bfloat16"
    assert variables["params"]["conv1"]["kernel"].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"d_model: \(16, 32\).*encoder_ffn_dim: \(64, 128\)"):
        import_whisper_pt(pt, expect=config.replace(d_model=32, encoder_ffn_dim=128))
    with pytest.raises(ValueError, match=r"num_mel_bins: \(128, 80\)"):
        import_whisper_pt(pt, expect=config.replace(num_mel_bins=80))


def test_malformed_files(hf, tmp_path):
    _, pt, _ = hf
    ckpt = torch.load(pt, weights_only=True)

    def save(obj) -> str:
        p = str(tmp_path / f"bad{len(os.listdir(tmp_path))}.pt")
        torch.save(obj, p)
        return p

    with pytest.raises(ValueError, match=r"no \['dims'\] dict"):
        import_whisper_pt(save({"model_state_dict": ckpt["model_state_dict"]}))
    with pytest.raises(ValueError, match=r"no \['model_state_dict'\] dict"):
        import_whisper_pt(save({"dims": ckpt["dims"]}))
    with pytest.raises(ValueError, match="expected a dict with 'dims'"):
        import_whisper_pt(save([1, 2]))
    dims = {k: v for k, v in ckpt["dims"].items() if k != "n_audio_head"}
    with pytest.raises(ValueError, match=r"dims: missing \['n_audio_head'\]"):
        import_whisper_pt(save({"dims": dims, "model_state_dict": ckpt["model_state_dict"]}))
    state = dict(ckpt["model_state_dict"])
    del state["encoder.blocks.1.mlp.0.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['layers.1.fc1.bias'\]"):
        import_whisper_pt(save({"dims": ckpt["dims"], "model_state_dict": state}))
    dec = {k: v for k, v in ckpt["model_state_dict"].items() if k.startswith("decoder.")}
    with pytest.raises(ValueError, match="no 'encoder.\\*' tensors"):
        import_whisper_pt(save({"dims": ckpt["dims"], "model_state_dict": dec}))
    with pytest.raises(ValueError, match="is not a file"):
        import_whisper_pt(str(tmp_path / "absent.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read as a torch checkpoint"):
        import_whisper_pt(str(tmp_path / "junk.pt"))


def test_cli_import_whisper_pt_writes_a_native_checkpoint(hf, tmp_path):
    from omni_jax.cli import convert
    from omni_jax.convert import registry

    _, pt, hf_dir = hf
    assert convert.main(["import-whisper-pt", pt, str(tmp_path / "native")]) == 0
    kind, config, params, _ = registry.load_native(str(tmp_path / "native"))
    hf_config, hf_vars = import_whisper_encoder(hf_dir)
    assert kind == "whisper_encoder" and config == hf_config
    jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, hf_vars))
    assert convert.main(["import-whisper-pt", str(tmp_path / "none.pt"), str(tmp_path / "x")]) \
        == 2
