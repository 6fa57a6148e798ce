"""BEATs encoder: Kaldi fbank vs an independent numpy reference, shapes, padding masks, errors.

No torchaudio in the environment: the fbank reference below is a plain per-frame numpy
transcription of Kaldi's compute-fbank-feats (float64), written without the module's code.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.encoders.beats import BEATsConfig, BEATsEncoder, beats_fbank, kaldi_fbank

CFG = BEATsConfig(embed_dim=24, encoder_embed_dim=32, encoder_layers=2,
                  encoder_attention_heads=4, encoder_ffn_embed_dim=48, conv_pos=8,
                  conv_pos_groups=4)


def numpy_kaldi_fbank(wave: np.ndarray, sr=16000, n_mels=128, low=20.0, preemph=0.97):
    """Kaldi fbank, one frame at a time (25 ms povey window, 10 ms shift, snip_edges)."""
    win, shift = int(0.025 * sr), int(0.010 * sr)
    n_fft = 1
    while n_fft < win:
        n_fft *= 2
    hz_to_mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    mel_lo, mel_hi = hz_to_mel(low), hz_to_mel(sr / 2.0)
    step = (mel_hi - mel_lo) / (n_mels + 1)
    banks = np.zeros((n_mels, n_fft // 2 + 1))
    for m in range(n_mels):
        lft, c, r = mel_lo + m * step, mel_lo + (m + 1) * step, mel_lo + (m + 2) * step
        for k in range(n_fft // 2):
            f = hz_to_mel(k * sr / n_fft)
            if lft < f < r:
                banks[m, k] = (f - lft) / (c - lft) if f <= c else (r - f) / (r - c)
    window = np.hanning(win) ** 0.85  # symmetric Hann ** 0.85 = Kaldi's povey window
    feats = []
    for start in range(0, len(wave) - win + 1, shift):
        frame = wave[start:start + win].astype(np.float64)
        frame = frame - frame.mean()
        out = frame.copy()
        out[1:] = frame[1:] - preemph * frame[:-1]
        out[0] = frame[0] - preemph * frame[0]
        spec = np.fft.rfft(out * window, n_fft)
        energies = banks @ (np.abs(spec) ** 2)
        feats.append(np.log(np.maximum(energies, np.finfo(np.float32).eps)))
    return np.stack(feats)


@pytest.fixture(scope="module")
def model():
    enc = BEATsEncoder(CFG)
    wave = jnp.zeros((1, 4000))
    params = enc.init(jax.random.key(0), wave)
    # non-trivial LayerNorm/bias params so masking bugs cannot hide behind zeros
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [
        x + 0.05 * jax.random.normal(k, jnp.shape(x)) for x, k in zip(leaves, keys)])
    return enc, params, jax.jit(enc.apply)


def test_fbank_matches_numpy_kaldi():
    rng = np.random.default_rng(0)
    t = np.arange(6000) / 16000
    wave = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.normal(size=t.size)) * 32768
    ref = numpy_kaldi_fbank(wave)
    got = np.asarray(kaldi_fbank(jnp.asarray(wave[None], jnp.float32), CFG))[0]
    assert got.shape == ref.shape == (CFG.num_frames(6000), 128) == (36, 128)
    np.testing.assert_allclose(got, ref, atol=5e-4, rtol=0)  # measured 5.4e-5
    norm = np.asarray(beats_fbank(jnp.asarray(wave[None] / 32768, jnp.float32), CFG))[0]
    np.testing.assert_allclose(norm, (ref - 15.41663) / (2 * 6.55582), atol=1e-3, rtol=0)


def test_shapes_and_token_count(model):
    enc, params, apply = model
    for n in (4000, 5000):
        out, valid = apply(params, jnp.zeros((2, n)))
        frames = 1 + (n - 400) // 160
        assert out.shape == (2, frames // 16 * 8, 32) == (2, CFG.num_tokens(n), 32)
        assert bool(valid.all())


def test_fbank_input_equals_waveform_input(model):
    _, params, apply = model
    wave = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4200)) * 0.1, jnp.float32)
    a, _ = apply(params, wave, lengths=jnp.array([4200, 3200]))
    b, _ = apply(params, fbank=beats_fbank(wave, CFG), lengths=jnp.array([24, 18]))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_padding_is_invisible_when_masked(model):
    _, params, apply = model
    rng = np.random.default_rng(2)
    n_long, n_short = 8000, 4400  # 48 frames (3 time blocks) vs 26 frames (1 time block)
    long_w = rng.normal(size=n_long) * 0.1
    short = rng.normal(size=n_short) * 0.1
    padded = np.concatenate([short, rng.normal(size=n_long - n_short)])  # junk padding
    batch = jnp.asarray(np.stack([long_w, padded]), jnp.float32)
    out, valid = apply(params, batch, lengths=jnp.array([n_long, n_short]))
    alone, _ = apply(params, jnp.asarray(short[None], jnp.float32))
    n_valid = CFG.num_tokens(n_short)
    assert n_valid == 8 and alone.shape[1] == n_valid
    assert np.asarray(valid).sum(axis=1).tolist() == [CFG.num_tokens(n_long), n_valid]
    np.testing.assert_allclose(np.asarray(out[1, :n_valid]), np.asarray(alone[0]), atol=1e-5)
    assert np.all(np.asarray(out[1, n_valid:]) == 0)
    full_alone, _ = apply(params, jnp.asarray(long_w[None], jnp.float32))
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(full_alone[0]), atol=1e-5)
    unmasked, _ = apply(params, batch)
    assert np.abs(np.asarray(unmasked[1, :n_valid]) - np.asarray(alone[0])).max() > 1e-2


def test_pre_ln_variant_runs():
    cfg = CFG.replace(layer_norm_first=True, deep_norm=False, embed_dim=32)
    enc = BEATsEncoder(cfg)
    params = enc.init(jax.random.key(0), jnp.zeros((1, 4000)))
    assert "post_extract_proj" not in params["params"]
    out, _ = enc.apply(params, jnp.ones((1, 4000)) * 0.01)
    assert out.shape == (1, CFG.num_tokens(4000), 32) == (1, 8, 32)
    assert np.isfinite(np.asarray(out)).all()


def test_config_errors():
    with pytest.raises(ValueError, match="patch_size=12 must divide num_mel_bins=128"):
        BEATsConfig(patch_size=12)
    with pytest.raises(ValueError, match="encoder_attention_heads=5 must divide"):
        BEATsConfig(encoder_attention_heads=5)
    with pytest.raises(ValueError, match="conv_pos_groups=3 must divide"):
        BEATsConfig(conv_pos_groups=3)
    with pytest.raises(ValueError, match="unknown keys \\['layers'\\]"):
        BEATsConfig.from_dict({"layers": 3})
    with pytest.raises(ValueError, match="low_freq < high_freq"):
        BEATsConfig(low_freq=9000.0)


@pytest.mark.parametrize("kw,match", [
    ({"waveform": jnp.zeros((3000,))}, "rank 2"),
    ({"waveform": jnp.zeros((1, 2000))}, "too short: 2000 samples"),
    ({"waveform": jnp.zeros((1, 4000), jnp.int16)}, "floating point"),
    ({"fbank": jnp.zeros((1, 20, 80))}, "128 mel bins"),
    ({"fbank": jnp.zeros((1, 10, 128))}, ">= 16 frames"),
    ({"waveform": jnp.zeros((1, 4000)), "lengths": jnp.array([1, 2])}, "lengths must be"),
    ({}, "exactly one of waveform or fbank"),
])
def test_bad_input(model, kw, match):
    enc, params, _ = model
    with pytest.raises(ValueError, match=match):
        enc.apply(params, **kw)
