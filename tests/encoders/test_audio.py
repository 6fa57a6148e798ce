"""WhisperEncoder: fp32 parity with transformers (full and short inputs), masking, bad input."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flax.core import meta  # noqa: E402
from transformers import WhisperConfig, WhisperModel  # noqa: E402

from omni_jax.convert.whisper import import_whisper_encoder  # noqa: E402
from omni_jax.encoders.audio import (  # noqa: E402
    WhisperEncoder,
    WhisperEncoderConfig,
    sinusoids,
)

MAX_POS = 50  # -> 100 mel frames for a "full-length" input of the tiny model


def tiny_hf_whisper(mels: int, seed: int = 0) -> WhisperModel:
    """A tiny random WhisperModel with every tensor (biases, norms too) randomized."""
    torch.manual_seed(seed)
    cfg = WhisperConfig(vocab_size=64, num_mel_bins=mels, d_model=32, encoder_layers=2,
                        encoder_attention_heads=4, encoder_ffn_dim=48, decoder_layers=1,
                        decoder_attention_heads=4, decoder_ffn_dim=48,
                        max_source_positions=MAX_POS, max_target_positions=16, pad_token_id=0,
                        bos_token_id=0, eos_token_id=0, decoder_start_token_id=0,
                        begin_suppress_tokens=None)
    model = WhisperModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=[80, 128])
def pair(request, tmp_path_factory):
    hf = tiny_hf_whisper(request.param, seed=request.param)
    d = str(tmp_path_factory.mktemp(f"whisper{request.param}"))
    hf.save_pretrained(d)
    config, variables = import_whisper_encoder(d)
    model = WhisperEncoder(config)
    return hf, config, variables, jax.jit(model.apply)


def torch_encoder_any_length(hf: WhisperModel, feats: np.ndarray) -> np.ndarray:
    """HF's encoder math from its own submodules, with positions embed_positions[:T]."""
    enc = hf.encoder
    with torch.no_grad():
        x = torch.from_numpy(feats)
        x = torch.nn.functional.gelu(enc.conv1(x))
        x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = x + enc.embed_positions.weight[: x.shape[1]]
        for layer in enc.layers:
            x = layer(x, None)
        return enc.layer_norm(x).numpy()


def test_full_length_matches_hf(pair):
    hf, config, variables, apply = pair
    feats = np.random.default_rng(1).normal(size=(2, config.num_mel_bins, 2 * MAX_POS))
    feats = feats.astype(np.float32)
    with torch.no_grad():
        ref = hf.encoder(torch.from_numpy(feats)).last_hidden_state.numpy()
    out = np.asarray(apply(variables, jnp.asarray(feats)))
    assert out.shape == (2, MAX_POS, config.d_model)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_short_input_matches_hf_submodules(pair):
    hf, config, variables, apply = pair
    feats = np.random.default_rng(2).normal(size=(2, config.num_mel_bins, 36)).astype(np.float32)
    with pytest.raises(ValueError):  # HF itself refuses non-full-length inputs
        hf.encoder(torch.from_numpy(feats))
    ref = torch_encoder_any_length(hf, feats)
    out = np.asarray(apply(variables, jnp.asarray(feats)))
    assert out.shape == (2, 18, config.d_model)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_frame_mask_makes_padding_invisible(pair):
    hf, config, variables, apply = pair
    rng = np.random.default_rng(3)
    lengths = [100, 37]  # odd length exercises the conv boundary
    feats = rng.normal(size=(2, config.num_mel_bins, 100)).astype(np.float32)
    feats[1, :, 37:] = rng.normal(size=(config.num_mel_bins, 63)) * 5.0  # junk in the padding
    masked = np.asarray(apply(variables, jnp.asarray(feats), lengths=jnp.asarray(lengths)))
    unmasked = np.asarray(apply(variables, jnp.asarray(feats)))
    # item 0 is full length: mask is a no-op there; matches HF
    with torch.no_grad():
        ref0 = hf.encoder(torch.from_numpy(feats[:1])).last_hidden_state.numpy()[0]
    np.testing.assert_allclose(masked[0], ref0, atol=1e-4, rtol=0)
    # item 1: valid outputs (ceil(37/2) = 19) equal HF's submodules run on the 37 frames alone
    ref1 = torch_encoder_any_length(hf, feats[1:2, :, :37])[0]
    assert ref1.shape == (19, config.d_model)
    np.testing.assert_allclose(masked[1, :19], ref1, atol=1e-4, rtol=0)
    assert np.all(masked[1, 19:] == 0.0)
    assert np.abs(unmasked[1, :19] - ref1).max() > 1e-2  # masking matters


def test_frame_mask_equals_lengths(pair):
    _, config, variables, apply = pair
    feats = jnp.asarray(np.random.default_rng(4).normal(size=(2, config.num_mel_bins, 40)),
                        jnp.float32)
    lengths = jnp.asarray([40, 21])
    mask = jnp.arange(40)[None] < lengths[:, None]
    a = apply(variables, feats, lengths=lengths)
    b = apply(variables, feats, frame_mask=mask)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_is_sinusoidal_and_shapes():
    config = WhisperEncoderConfig(d_model=16, encoder_layers=1, encoder_attention_heads=2,
                                  encoder_ffn_dim=32, max_source_positions=10)
    model = WhisperEncoder(config)
    x = jnp.zeros((1, 80, 20))
    params = meta.unbox(model.init(jax.random.key(0), x)["params"])
    np.testing.assert_allclose(params["embed_positions"], sinusoids(10, 16), atol=1e-6)
    assert "bias" not in params["layers_0"]["attn"]["k"]  # Whisper: no key bias
    assert params["layers_0"]["attn"]["q"]["bias"].shape == (2, 8)
    assert model.apply({"params": params}, jnp.zeros((3, 80, 8))).shape == (3, 4, 16)


def test_config_validation():
    with pytest.raises(ValueError, match="must divide d_model"):
        WhisperEncoderConfig(d_model=30, encoder_attention_heads=4)
    with pytest.raises(ValueError, match="num_mel_bins must be 80 or 128"):
        WhisperEncoderConfig(num_mel_bins=64)
    with pytest.raises(ValueError, match="unknown keys \\['d_modle'\\]"):
        WhisperEncoderConfig.from_dict({"d_modle": 8})
    with pytest.raises(ValueError, match="unknown activation"):
        WhisperEncoderConfig(activation_function="swish2")
    with pytest.raises(ValueError, match="encoder_layers must be positive"):
        WhisperEncoderConfig(encoder_layers=0)
    cfg = WhisperEncoderConfig.from_dict({"d_model": 8, "encoder_attention_heads": 2})
    assert cfg.head_dim == 4


@pytest.mark.parametrize("shape,dtype,kw,match", [
    ((80, 20), jnp.float32, {}, "rank 3"),
    ((1, 128, 20), jnp.float32, {}, "expected 80 mel bins"),
    ((1, 80, 22), jnp.float32, {}, "frames must be even and in \\[2, 20\\]"),
    ((1, 80, 7), jnp.float32, {}, "frames must be even"),
    ((1, 80, 20), jnp.int32, {}, "floating point"),
    ((1, 80, 20), jnp.float32, {"lengths": jnp.array([3, 4])}, "lengths must be \\[batch\\]"),
    ((1, 80, 20), jnp.float32, {"frame_mask": jnp.ones((1, 10), bool)}, "frame_mask must be"),
])
def test_bad_input(shape, dtype, kw, match):
    config = WhisperEncoderConfig(d_model=8, encoder_layers=1, encoder_attention_heads=2,
                                  encoder_ffn_dim=16, max_source_positions=10)
    model = WhisperEncoder(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 80, 20)))
    with pytest.raises(ValueError, match=match):
        model.apply(params, jnp.zeros(shape, dtype), **kw)
