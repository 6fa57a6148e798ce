"""BEATs encoder vs a PyTorch transcription of unilm's code (beats_torch_ref), fbank vs Kaldi.

No torchaudio in the environment: the fbank references are a float64 per-frame numpy
transcription of Kaldi's compute-fbank-feats (below) and beats_torch_ref.kaldi_fbank (torchaudio's
float32 computation); neither uses the module's code.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from beats_torch_ref import BEATsRef, SelfAttention, randomize
from beats_torch_ref import kaldi_fbank as torch_kaldi_fbank

from omni_jax.convert.beats import config_from_unilm, unilm_to_params
from omni_jax.encoders.beats import (
    BEATsConfig,
    BEATsEncoder,
    beats_fbank,
    kaldi_fbank,
    reduce_padding_mask,
    relative_position_buckets,
)

TINY = dict(input_patch_size=16, embed_dim=24, encoder_embed_dim=32, encoder_layers=2,
            encoder_attention_heads=4, encoder_ffn_embed_dim=48, conv_pos=8, conv_pos_groups=4,
            relative_position_embedding=True, num_buckets=16, max_distance=20, gru_rel_pos=True)
VARIANTS = {
    "post_ln_deep_norm": dict(deep_norm=True, layer_norm_first=False),  # the released layout
    "post_ln_ungated": dict(deep_norm=False, layer_norm_first=False, gru_rel_pos=False),
    "pre_ln_odd_conv": dict(deep_norm=False, layer_norm_first=True, conv_pos=7),
    "no_rel_pos": dict(deep_norm=True, relative_position_embedding=False, embed_dim=32),
}
N = 8757  # 53 fbank frames: 3 patch rows + 5 dropped frames; 8757 % 53 = 12 samples trimmed
CFG = config_from_unilm(TINY)


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


def waves(b=2, n=N, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 3100 * t)
    return (tone[None] + 0.05 * rng.normal(size=(b, n))).astype(np.float32)


def build(cfg_dict, seed=1):
    ref = randomize(BEATsRef(cfg_dict), seed=seed)
    config = config_from_unilm(cfg_dict)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    return ref, config, {"params": unilm_to_params(config, sd)}


@pytest.fixture(scope="module")
def tiny():
    ref, config, params = build({**TINY, "deep_norm": True})
    return ref, config, params, jax.jit(BEATsEncoder(config).apply)


def test_fbank_matches_kaldi_references():
    wave = waves(1, 6000)[0].astype(np.float64) * 32768
    ref64 = numpy_kaldi_fbank(wave)
    ref32 = torch_kaldi_fbank(torch.from_numpy(wave.astype(np.float32))).numpy()
    got = np.asarray(kaldi_fbank(jnp.asarray(wave[None], jnp.float32), CFG))[0]
    assert got.shape == ref64.shape == ref32.shape == (CFG.num_frames(6000), 128) == (36, 128)
    np.testing.assert_allclose(got, ref64, atol=2e-4, rtol=0)  # measured 9.2e-5
    # torchaudio's float32 path is itself 1.1e-4 off the float64 definition (lowest bins)
    np.testing.assert_allclose(got, ref32, atol=3e-4, rtol=0)  # measured 1.3e-4
    norm = np.asarray(beats_fbank(jnp.asarray(wave[None] / 32768, jnp.float32), CFG))[0]
    want = (ref64 - 15.41663) / (2 * 6.55582)
    np.testing.assert_allclose(norm, want, atol=2e-5, rtol=0)  # measured 7e-6


@pytest.mark.parametrize("num_buckets,max_distance", [(320, 800), (16, 20), (32, 128)])
def test_relative_position_buckets_match_unilm(num_buckets, max_distance):
    n = 1600
    attn = SelfAttention({**TINY, "num_buckets": num_buckets, "max_distance": max_distance})
    want = attn.buckets(n).numpy()  # [query, key]
    table = relative_position_buckets(n, num_buckets, max_distance)
    rel = np.arange(n)[None, :] - np.arange(n)[:, None] + n - 1
    np.testing.assert_array_equal(table[rel], want)
    assert table.min() == 0 and table.max() == num_buckets - 1


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_unilm_reference(variant):
    ref, config, params = build({**TINY, **VARIANTS[variant]})
    assert ("relative_attention_bias" in params["params"]) == config.relative_position_embedding
    apply = jax.jit(BEATsEncoder(config).apply)
    wave = waves()
    pad = np.zeros(wave.shape, bool)
    pad[0, 2000:4000] = True  # unilm takes any mask: a hole in the middle
    pad[1, 5000:] = True
    with torch.no_grad():
        want, _ = ref(torch.from_numpy(wave))
        want_m, ref_pad = ref(torch.from_numpy(wave), torch.from_numpy(pad))
        fb = ref.preprocess(torch.from_numpy(wave)).numpy()
    got_fb, valid = apply(params, fbank=jnp.asarray(fb))  # the encoder alone, on unilm's fbank
    assert got_fb.shape == (2, 24, 32) and bool(valid.all())
    np.testing.assert_allclose(np.asarray(got_fb), want.numpy(), atol=5e-6, rtol=0)  # 1.1e-6
    # one call: rows 0-1 with an all-False mask (= no padding), rows 2-3 padded
    both = np.concatenate([np.zeros_like(pad), pad])
    got, valid = apply(params, jnp.asarray(np.concatenate([wave, wave])),
                       padding_mask=jnp.asarray(both))
    got, valid = np.asarray(got), np.asarray(valid)
    assert bool(valid[:2].all())
    # waveform in: the two float32 FFTs differ (see the fbank test); measured 1.5e-5 on one
    # CPU, up to 5.2e-5 (1 of 1536 values; which config varies between runs) on another
    np.testing.assert_allclose(got[:2], want.numpy(), atol=1e-4, rtol=0)
    got_m, valid_m = got[2:], valid[2:]
    np.testing.assert_array_equal(valid_m, ~ref_pad.numpy())
    assert valid_m.sum(1).tolist() == [19, 16]  # tokens 7..11 and 16.. have all frames padded
    np.testing.assert_allclose(got_m[valid_m], want_m.numpy()[valid_m], atol=1e-4,
                               rtol=0)  # measured 1.4e-5 on one CPU, 5.0e-5 on another
    assert np.all(got_m[~valid_m] == 0)
    assert np.abs(got_m[1, :16] - got[1, :16]).max() > 1e-2


def test_lengths_mask_and_fbank_input_agree(tiny):
    _, config, params, apply = tiny
    wave = jnp.asarray(waves(seed=3))
    lengths = jnp.array([N, 5000])
    pad = jnp.arange(N)[None] >= lengths[:, None]
    a, va = apply(params, wave, lengths=lengths)
    b, vb = apply(params, wave, padding_mask=pad)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(va), np.asarray(vb))
    assert np.asarray(va).sum(1).tolist() == [24, 16]
    fb = beats_fbank(wave, config)  # frame-level mask for fbank input, as unilm reduces it
    c, vc = apply(params, fbank=fb, padding_mask=reduce_padding_mask(pad, fb.shape[1]))
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), atol=1e-6)  # measured 0
    np.testing.assert_array_equal(np.asarray(vc), np.asarray(va))


def test_shapes_and_token_count(tiny):
    _, config, params, apply = tiny
    n = 5000
    out, valid = apply(params, jnp.zeros((2, n)))
    frames = 1 + (n - 400) // 160
    assert out.shape == (2, frames // 16 * 8, 32) == (2, config.num_tokens(n), 32) == (2, 8, 32)
    assert bool(valid.all())
    assert BEATsConfig().num_tokens(480000) == 1496  # Ola: 30 s -> 2998 frames -> 187 x 8


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
    with pytest.raises(ValueError, match="deep_norm needs post-LN"):
        BEATsConfig(layer_norm_first=True, deep_norm=True)
    with pytest.raises(ValueError, match="max_distance > num_buckets // 4"):
        BEATsConfig(num_buckets=320, max_distance=80)
    with pytest.raises(ValueError, match="activation_fn: unknown value 'glu'"):
        BEATsConfig(activation_fn="glu")


@pytest.mark.parametrize("kw,match", [
    ({"waveform": jnp.zeros((3000,))}, "rank 2"),
    ({"waveform": jnp.zeros((1, 2000))}, "too short: 2000 samples"),
    ({"waveform": jnp.zeros((1, 4000), jnp.int16)}, "floating point"),
    ({"fbank": jnp.zeros((1, 20, 80))}, "128 mel bins"),
    ({"fbank": jnp.zeros((1, 10, 128))}, ">= 16 frames"),
    ({"waveform": jnp.zeros((1, 4000)), "lengths": jnp.array([1, 2])}, "lengths must be"),
    ({"waveform": jnp.zeros((1, 4000)), "padding_mask": jnp.zeros((1, 30), bool)},
     "padding_mask must be \\(1, 4000\\)"),
    ({"waveform": jnp.zeros((1, 4000)), "padding_mask": jnp.zeros((1, 4000), bool),
      "lengths": jnp.array([4000])}, "not both"),
    ({}, "exactly one of waveform or fbank"),
])
def test_bad_input(tiny, kw, match):
    _, config, params, _ = tiny
    with pytest.raises(ValueError, match=match):
        BEATsEncoder(config).apply(params, **kw)
