"""OmniModel with Ola's chunked dual-encoder audio tower: token layout, channel order, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.adapters.speech_projector import SpeechProjector
from omni_jax.encoders.audio import WhisperEncoder
from omni_jax.encoders.audio_path import OlaAudioEncoder
from omni_jax.encoders.beats import BEATsEncoder
from omni_jax.model import AUDIO_WAVE, OmniModel, check_batch, media_shapes, tokens_per_item
from omni_jax.omni_config import OmniConfig

D, CW, CB = 32, 16, 8  # LLM width, Whisper width, BEATs width
LLM = dict(vocab_size=64, hidden_size=D, intermediate_size=48, num_layers=1, num_heads=4,
           num_kv_heads=2, max_position_embeddings=128)
WHISPER = dict(num_mel_bins=80, d_model=CW, encoder_layers=1, encoder_attention_heads=2,
               encoder_ffn_dim=32, max_source_positions=50)
BEATS = dict(embed_dim=8, encoder_embed_dim=CB, encoder_layers=1, encoder_attention_heads=2,
             encoder_ffn_embed_dim=16, conv_pos=4, conv_pos_groups=2)
CHUNKS, STACK = 3, 10  # 1 s chunks: 100 mel frames -> 50 Whisper rows, 48 BEATs tokens


def audio_tower(beats=BEATS, in_dim=CW + CB, **kw):
    enc = dict(whisper=WHISPER, beats=beats, chunk_seconds=1, max_chunks=4)
    tower = dict(encoder="ola_audio", encoder_config=enc, adapter="speech", num_chunks=CHUNKS,
                 adapter_config=dict(in_dim=in_dim, out_dim=D, hidden_dim=32, stack=STACK))
    tower.update(kw)
    return tower


def config(**audio):
    return OmniConfig.from_dict({"llm": LLM, "audio": audio_tower(**audio)})


def inputs(n, seed=0):
    rng = np.random.default_rng(seed)
    mel = jnp.asarray(rng.normal(size=(n, CHUNKS, 80, 100)), jnp.float32)
    wave = jnp.asarray(rng.normal(size=(n, CHUNKS, 16000)) * 0.1, jnp.float32)
    return mel, wave


@pytest.fixture(scope="module")
def built():
    cfg = config()
    per = tokens_per_item(cfg, "audio")
    mod = np.zeros((2, 40), np.int32)
    mod[0, 3:3 + per] = 3  # item 0 in row 0, item 1 in row 1
    mod[1, 10:10 + per] = 3
    mel, wave = inputs(2)
    batch = {"input_ids": jnp.asarray(np.random.default_rng(1).integers(0, 64, mod.shape)),
             "modality": jnp.asarray(mod), "audio": mel, AUDIO_WAVE: wave}
    model = OmniModel(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch))
    run = jax.jit(lambda p, b: model.apply(p, b, method=lambda m, b: (
        m.audio_features(b["audio"], b[AUDIO_WAVE]), m.embed_inputs(b), m(b)["logits"])))
    out = [np.asarray(a) for a in run(params, batch)]  # features, LLM input, logits
    return cfg, model, params, batch, out


def test_token_counts_and_media_shapes():
    cfg = config()
    per_chunk = 50 // STACK  # max(50 Whisper rows, 48 BEATs tokens) rows, stacked by 10
    assert cfg.audio.encoder_config.num_frames == 50 and cfg.audio.num_frames == 100
    assert tokens_per_item(cfg, "audio") == 1 + CHUNKS * (per_chunk + 1) + 1 == 20
    assert media_shapes(cfg) == {"audio": (CHUNKS, 80, 100), AUDIO_WAVE: (CHUNKS, 16000)}
    whisper_only = config(beats=None, in_dim=CW, num_chunks=2)
    assert tokens_per_item(whisper_only, "audio") == 1 + 2 * (5 + 1) + 1
    assert media_shapes(whisper_only) == {"audio": (2, 80, 100)}


def test_projector_sees_whisper_then_beats_channels(built):
    cfg, model, params, batch, (feats, x, _) = built
    p, enc = params["params"]["audio_encoder"], cfg.audio.encoder_config

    @jax.jit
    def direct(mel, wave):  # OlaAudioEncoder per item of 3 chunks; both encoders on all chunks
        ola = [OlaAudioEncoder(enc).apply({"params": p}, mel[i], wave[i])["features"]
               for i in range(2)]
        w = WhisperEncoder(enc.whisper).apply({"params": p["whisper"]},
                                              mel.reshape(-1, 80, 100))  # [6, 50, CW]
        b, _ = BEATsEncoder(enc.beats).apply({"params": p["beats"]},
                                             wave.reshape(-1, 16000))  # [6, 48, CB]
        proj = SpeechProjector(cfg.audio.adapter_config).apply(
            {"params": params["params"]["audio_adapter"]}, feats)
        return jnp.stack(ola), w, b, proj

    ola, w, b, proj = (np.asarray(a) for a in direct(batch["audio"], batch[AUDIO_WAVE]))
    assert feats.shape == (2, CHUNKS, 50, CW + CB)
    np.testing.assert_allclose(feats, ola, atol=1e-5)
    flat = feats.reshape(-1, 50, CW + CB)
    np.testing.assert_allclose(flat[..., :CW], w, atol=1e-5)  # Whisper channels first
    np.testing.assert_allclose(flat[:, :48, CW:], b, atol=1e-5)  # then BEATs
    assert np.all(flat[:, 48:, CW:] == 0)  # BEATs zero-padded to Whisper's 50 rows
    mod = np.asarray(batch["modality"])
    for i in range(2):  # the spliced LLM input holds the projector's output of these features
        np.testing.assert_allclose(x[i][mod[i] == 3], proj[i], atol=1e-5)


def test_each_chunks_newline_follows_its_rows_in_the_llm_input(built):
    cfg, model, params, batch, (feats, x, logits) = built
    mod = np.asarray(batch["modality"])
    pa = params["params"]["audio_adapter"]
    vec = {k: np.asarray(pa[k]) for k in ("speech_begin", "speech_newline", "speech_end")}
    alone = np.asarray(jax.jit(SpeechProjector(cfg.audio.adapter_config).apply)(
        {"params": pa}, feats.reshape(2 * CHUNKS, 1, 50, CW + CB)))  # each chunk by itself
    per = 50 // STACK
    for i in range(2):
        seq = x[i][mod[i] == 3]  # [20, D]: this item's spliced embeddings
        np.testing.assert_allclose(seq[0], vec["speech_begin"], atol=1e-6)
        np.testing.assert_allclose(seq[-1], vec["speech_end"], atol=1e-6)
        for k in range(CHUNKS):
            start = 1 + k * (per + 1)
            np.testing.assert_allclose(seq[start:start + per], alone[i * CHUNKS + k, 1:1 + per],
                                       atol=1e-5)
            np.testing.assert_allclose(seq[start + per], vec["speech_newline"], atol=1e-6)
    assert not np.allclose(x[0][mod[0] == 3][1:6], x[1][mod[1] == 3][1:6])
    tok = np.asarray(params["params"]["llm"]["embed"]["embedding"])[
        np.asarray(batch["input_ids"])]
    np.testing.assert_array_equal(x[mod == 0], tok[mod == 0])  # text untouched
    assert logits.shape == (2, 40, 64) and bool(np.isfinite(logits).all())


def test_whisper_only_chunked_tower_needs_no_waveforms():
    cfg = config(beats=None, in_dim=CW, num_chunks=2)
    model = OmniModel(cfg)
    mel = jax.ShapeDtypeStruct((1, 2, 80, 100), jnp.float32)
    params = jax.eval_shape(lambda m: model.init(jax.random.key(0), "audio", m,
                                                 method=OmniModel.encode), mel)
    assert set(params["params"]["audio_encoder"]) == {"whisper"}
    out = jax.eval_shape(lambda p, m: model.apply(p, "audio", m, method=OmniModel.encode),
                         params, mel)
    assert out.shape == (1, tokens_per_item(cfg, "audio"), D)


def test_bad_audio_batches(built):
    cfg, model, params, batch = built[:4]
    with pytest.raises(ValueError, match=r"needs 'audio_wave' \[n, chunks, samples\] = "
                                         r"\(2, 3, 16000\) next to audio, got None"):
        check_batch(cfg, {k: v for k, v in batch.items() if k != AUDIO_WAVE})
    with pytest.raises(ValueError, match=r"audio must be \[n, 3, 80, 100\] \(ola_audio tower\), "
                                         r"got \(2, 80, 100\)"):
        check_batch(cfg, dict(batch, audio=batch["audio"][:, 0]))
    with pytest.raises(ValueError, match=r"got \(2, 2, 16000\)"):
        model.apply(params, dict(batch, audio_wave=batch[AUDIO_WAVE][:, :2]))
    with pytest.raises(ValueError, match="takes no waveforms"):
        check_batch(config(beats=None, in_dim=CW), batch)
    bad = dict(batch, modality=batch["modality"].at[0, 0].set(3))
    with pytest.raises(ValueError, match="not a whole number of items of 20 tokens"):
        check_batch(cfg, bad)


@pytest.mark.parametrize("change, match", [
    (dict(num_chunks=None), r"needs num_chunks \(chunks per item\) in \[1, max_chunks=4\]"),
    (dict(num_chunks=5), r"in \[1, max_chunks=4\], got 5"),
    (dict(num_frames=3000), "num_frames=3000 but a 1 s chunk gives 100 mel frames"),
    (dict(in_dim=CW), r"in_dim=16 must equal the ola_audio encoder's output channels 24"),
    (dict(encoder_config=dict(whisper=WHISPER, beats=BEATS, chunk_seconds=1,
                              mask_padding=True)), "mask_padding=True is not supported"),
    (dict(encoder="whisper", encoder_config=WHISPER, in_dim=CW, num_frames=100),
     "num_chunks is only for the chunked audio encoders"),
])
def test_bad_audio_configs(change, match):
    with pytest.raises(ValueError, match=match):
        config(**change)
