"""Ola dual audio path: chunking, shapes, [whisper | beats] order, alignment, padding masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.encoders.audio import WhisperEncoder, WhisperEncoderConfig
from omni_jax.encoders.audio_path import OlaAudioConfig, OlaAudioEncoder, chunk_waveform
from omni_jax.encoders.beats import BEATsConfig, BEATsEncoder

WHISPER = WhisperEncoderConfig(num_mel_bins=128, d_model=16, encoder_layers=1,
                               encoder_attention_heads=2, encoder_ffn_dim=32,
                               max_source_positions=20)
BEATS = BEATsConfig(embed_dim=8, encoder_embed_dim=8, encoder_layers=1,
                    encoder_attention_heads=2, encoder_ffn_embed_dim=16, conv_pos=4,
                    conv_pos_groups=2)
CFG = OlaAudioConfig(whisper=WHISPER, beats=BEATS, chunk_seconds=0.4, max_chunks=3)


def inputs(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    mel = jnp.asarray(rng.normal(size=(n, 128, CFG.mel_frames)), jnp.float32)
    wave = jnp.asarray(rng.normal(size=(n, CFG.chunk_samples)) * 0.1, jnp.float32)
    return mel, wave


@pytest.fixture(scope="module")
def built():
    model = OlaAudioEncoder(CFG)
    mel, wave = inputs(2)
    params = model.init(jax.random.key(0), mel, wave)
    return model, params, jax.jit(model.apply)


def test_chunking_counts():
    cs = CFG.chunk_samples
    assert cs == 6400 and CFG.mel_frames == 40
    for n, want in [(1, 1), (cs, 1), (cs + 1, 2), (3 * cs, 3), (10 * cs + 5, 3)]:
        assert CFG.num_chunks(n) == want
        wave = np.arange(n, dtype=np.float32) + 1
        chunks, lengths = chunk_waveform(wave, CFG)
        assert chunks.shape == (want, cs)
        assert lengths.tolist() == [min(cs, n - i * cs) for i in range(want)]
        flat = chunks.reshape(-1)
        np.testing.assert_array_equal(flat[: min(n, 3 * cs)], wave[: 3 * cs])
        assert np.all(flat[min(n, 3 * cs):] == 0)  # last chunk zero-padded
    with pytest.raises(ValueError, match="empty waveform"):
        chunk_waveform(np.zeros(0, np.float32), CFG)
    with pytest.raises(ValueError, match="1-D float waveform"):
        chunk_waveform(np.zeros((2, 5), np.float32), CFG)


def test_shapes_and_concat_order(built):
    model, params, apply = built
    mel, wave = inputs(2, seed=1)
    out = apply(params, mel, wave)
    feats, mask = np.asarray(out["features"]), np.asarray(out["mask"])
    assert CFG.whisper_frames == 20 and CFG.beats_tokens == 16 and CFG.num_frames == 20
    assert feats.shape == (2, 20, 16 + 8) and CFG.out_dim == 24
    w = WhisperEncoder(WHISPER).apply({"params": params["params"]["whisper"]}, mel)
    b, _ = BEATsEncoder(BEATS).apply({"params": params["params"]["beats"]}, wave)
    np.testing.assert_allclose(feats[..., :16], np.asarray(w), atol=1e-5)  # whisper first
    np.testing.assert_allclose(feats[:, :16, 16:], np.asarray(b), atol=1e-5)  # then beats
    assert np.all(feats[:, 16:, 16:] == 0)  # beats zero-padded 16 -> 20 rows
    assert mask.all()


@pytest.mark.parametrize("align,rows", [("max", 64), ("whisper", 20)])
def test_alignment_when_beats_is_longer(align, rows):
    cfg = CFG.replace(beats=BEATS.replace(patch_size=8), align=align)
    assert cfg.beats_tokens == 4 * 16 and cfg.num_frames == rows
    model = OlaAudioEncoder(cfg)
    mel, wave = inputs(1, seed=2)
    params = model.init(jax.random.key(0), mel, wave)
    feats = np.asarray(model.apply(params, mel, wave)["features"])
    assert feats.shape == (1, rows, 24)
    b, _ = BEATsEncoder(cfg.beats).apply({"params": params["params"]["beats"]}, wave)
    np.testing.assert_allclose(feats[0, :, 16:], np.asarray(b)[0, :rows], atol=1e-5)
    assert np.all(feats[0, 20:, :16] == 0)  # whisper padded when align="max"


def test_padding_masked_when_enabled():
    cfg = CFG.replace(mask_padding=True)
    model = OlaAudioEncoder(cfg)
    mel, wave = inputs(2, seed=3)
    params = model.init(jax.random.key(0), mel, wave)
    lengths = jnp.array([6400, 3000])  # last chunk: 19 mel frames, 17 fbank frames
    rng = np.random.default_rng(4)
    mel2 = mel.at[1, :, 19:].set(jnp.asarray(rng.normal(size=(128, 21)) * 3, jnp.float32))
    wave2 = wave.at[1, 3000:].set(jnp.asarray(rng.normal(size=3400), jnp.float32))
    a = model.apply(params, mel, wave, lengths)
    b = model.apply(params, mel2, wave2, lengths)
    mask = np.asarray(a["mask"])
    assert mask[0].all() and mask[1].sum() == 10 and mask[1, :10].all()  # whisper: ceil(19/2)
    np.testing.assert_allclose(np.asarray(a["features"])[1, :10, :16],
                               np.asarray(b["features"])[1, :10, :16], atol=1e-5)
    # BEATs masks as unilm's forward_padding_mask: 38 frames of 168 samples, 16 tokens of 2
    # frames; frames 18.. and so tokens 9.. are all padding (token 8 still sees some junk)
    pad = jnp.arange(cfg.chunk_samples)[None] >= lengths[:, None]
    want, valid = BEATsEncoder(cfg.beats).apply({"params": params["params"]["beats"]}, wave,
                                                padding_mask=pad)
    assert np.asarray(valid).sum(1).tolist() == [16, 9]
    np.testing.assert_allclose(np.asarray(a["features"])[:, :16, 16:], np.asarray(want),
                               atol=1e-6)
    assert np.all(np.asarray(a["features"])[1, 9:, 16:] == 0)
    off = OlaAudioEncoder(CFG)  # Ola default: no masks -> the junk leaks into valid rows
    c = off.apply(params, mel, wave, lengths)["features"]
    d = off.apply(params, mel2, wave2, lengths)["features"]
    assert np.abs(np.asarray(c)[1, :8] - np.asarray(d)[1, :8]).max() > 1e-2


def test_whisper_only_path():
    cfg = OlaAudioConfig.from_dict({"whisper": WHISPER.to_dict(), "beats": None,
                                    "chunk_seconds": 0.4})
    model = OlaAudioEncoder(cfg)
    mel, _ = inputs(2, seed=5)
    params = model.init(jax.random.key(0), mel)
    out = model.apply(params, mel)
    assert cfg.out_dim == 16 and out["features"].shape == (2, 20, 16)
    w = WhisperEncoder(WHISPER).apply({"params": params["params"]["whisper"]}, mel)
    np.testing.assert_array_equal(np.asarray(out["features"]), np.asarray(w))


def test_errors(built):
    model, params, _ = built
    mel, wave = inputs(2)
    with pytest.raises(ValueError, match="mel must be \\[chunks, 128, 40\\]"):
        model.apply(params, mel[:, :, :30], wave)
    with pytest.raises(ValueError, match="needs the chunk waveforms"):
        model.apply(params, mel)
    with pytest.raises(ValueError, match="waveform must be \\[chunks, samples\\]"):
        model.apply(params, mel, wave[:1])
    m4, w4 = inputs(4)
    with pytest.raises(ValueError, match="4 chunks > max_chunks=3"):
        model.apply(params, m4, w4)
    with pytest.raises(ValueError, match="align: unknown value 'min'"):
        CFG.replace(align="min")
    with pytest.raises(ValueError, match="Whisper needs an even number <= 40"):
        CFG.replace(chunk_seconds=0.5)
    with pytest.raises(ValueError, match="unknown keys \\['chunks'\\]"):
        OlaAudioConfig.from_dict({"chunks": 3})
