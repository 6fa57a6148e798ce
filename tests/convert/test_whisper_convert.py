"""Whisper encoder conversion: HF dir -> params -> HF dir round trips; bad checkpoints."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flax.core import meta  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    WhisperConfig,
    WhisperForConditionalGeneration,
    WhisperModel,
)

from omni_jax.convert.whisper import export_whisper_encoder, import_whisper_encoder  # noqa: E402
from omni_jax.encoders.audio import WhisperEncoder, WhisperEncoderConfig  # noqa: E402


def tiny_config(mels: int = 80) -> WhisperConfig:
    return WhisperConfig(vocab_size=64, num_mel_bins=mels, d_model=16, encoder_layers=2,
                         encoder_attention_heads=2, encoder_ffn_dim=24, decoder_layers=1,
                         decoder_attention_heads=2, decoder_ffn_dim=24, max_source_positions=8,
                         max_target_positions=8, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                         decoder_start_token_id=0, begin_suppress_tokens=None)


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def encoder_state(model) -> dict[str, np.ndarray]:
    base = model.model if hasattr(model, "model") else model
    return {k: v.detach().numpy() for k, v in base.encoder.state_dict().items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    hf = randomize(WhisperModel(tiny_config(128)))
    d = str(tmp_path_factory.mktemp("hf"))
    hf.save_pretrained(d)
    return hf, d


def test_import_export_round_trip_encoder_only(saved, tmp_path):
    hf, d = saved
    config, variables = import_whisper_encoder(d)
    assert config == WhisperEncoderConfig(num_mel_bins=128, d_model=16, encoder_layers=2,
                                          encoder_attention_heads=2, encoder_ffn_dim=24,
                                          max_source_positions=8)
    # the imported tree has exactly the structure/shapes our module initializes
    model = WhisperEncoder(config)
    init = meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 128, 16))))
    assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, variables)
    out = str(tmp_path / "out")
    export_whisper_encoder(config, variables, out)
    back = WhisperModel.from_pretrained(out)
    ref, got = encoder_state(hf), encoder_state(back)
    assert sorted(ref) == sorted(got)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    # decoder is not carried: it is freshly initialized, so it differs from the original
    assert not np.allclose(back.decoder.layers[0].fc1.weight.detach().numpy(),
                           hf.decoder.layers[0].fc1.weight.detach().numpy())


def test_export_with_base_carries_decoder(tmp_path):
    torch.manual_seed(1)
    hf = randomize(WhisperForConditionalGeneration(tiny_config(80)))
    base = str(tmp_path / "base")
    hf.save_pretrained(base)
    config, variables = import_whisper_encoder(base)  # keys "model.encoder.*"
    p = variables["params"]
    p["layers_1"]["mlp"]["fc2"]["bias"] = p["layers_1"]["mlp"]["fc2"]["bias"] + 1.0
    out = str(tmp_path / "out")
    export_whisper_encoder(config, variables, out, base_dir=base)
    back = WhisperForConditionalGeneration.from_pretrained(out)
    ref_full = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    got_full = {k: v.detach().numpy() for k, v in back.state_dict().items()}
    changed = "model.encoder.layers.1.fc2.bias"
    np.testing.assert_allclose(got_full[changed], ref_full[changed] + 1.0, atol=1e-6)
    for k in ref_full:
        if k != changed:
            np.testing.assert_array_equal(got_full[k], ref_full[k], err_msg=k)
    # and it also loads as a plain WhisperModel with the new encoder
    enc = encoder_state(WhisperModel.from_pretrained(out))
    np.testing.assert_allclose(enc["layers.1.fc2.bias"], ref_full[changed] + 1.0, atol=1e-6)


def test_export_base_mismatch(saved, tmp_path):
    _, d = saved
    config, variables = import_whisper_encoder(d)
    other = WhisperEncoder(config.replace(encoder_layers=1))
    params = other.init(jax.random.key(0), jnp.zeros((1, 128, 16)))
    with pytest.raises(ValueError, match="config differs from base.*encoder_layers"):
        export_whisper_encoder(config.replace(encoder_layers=1), params, str(tmp_path), d)
    with pytest.raises(ValueError, match="missing layers_1/attn/q/kernel"):
        export_whisper_encoder(config, params, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="LayerNorm eps"):
        export_whisper_encoder(config.replace(layer_norm_eps=1e-6), variables, str(tmp_path))


def _corrupt(d: str, tmp_path, edit) -> str:
    out = tmp_path / "bad"
    out.mkdir()
    tensors = load_file(os.path.join(d, "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(d, "config.json")) as f:
        (out / "config.json").write_text(f.read())
    return str(out)


def test_bad_checkpoints(saved, tmp_path):
    _, d = saved

    def edit(t):
        del t["encoder.layers.0.fc1.bias"]
        t["encoder.layers.0.self_attn.k_proj.bias"] = np.zeros(16, np.float32)
        t["encoder.conv1.weight"] = np.zeros((16, 80, 3), np.float32)

    bad = _corrupt(d, tmp_path, edit)
    with pytest.raises(ValueError) as e:
        import_whisper_encoder(bad)
    msg = str(e.value)
    assert "missing keys ['layers.0.fc1.bias']" in msg
    assert "unexpected keys ['layers.0.self_attn.k_proj.bias']" in msg
    assert "conv1.weight: expected (16, 128, 3), got (16, 80, 3)" in msg

    cfg = json.loads((tmp_path / "bad" / "config.json").read_text())
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'whisper'"):
        import_whisper_encoder(bad)
    with pytest.raises(ValueError, match="no config.json"):
        import_whisper_encoder(str(tmp_path / "nowhere"))


def test_no_encoder_keys(saved, tmp_path):
    _, d = saved
    bad = _corrupt(d, tmp_path, lambda t: [t.pop(k) for k in list(t) if k.startswith("encoder")])
    with pytest.raises(ValueError, match="no Whisper encoder tensors"):
        import_whisper_encoder(bad)
