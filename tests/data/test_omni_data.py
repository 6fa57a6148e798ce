"""Omni records -> examples with media -> packed batches whose media follow the layout order."""

import io
import json

import jax
import numpy as np
import pytest
import soundfile as sf

from omni_jax.data import packing
from omni_jax.data.features import audio as afeat
from omni_jax.data.features.config import AudioConfig
from omni_jax.data.fixtures import make_fixtures
from omni_jax.data.omni import OmniEncoder, media_spec
from omni_jax.data.pipeline import make_dataset
from omni_jax.data.template import ChatTemplate
from omni_jax.data.tokenizer import TokenizerConfig, load_tokenizer, train_sentencepiece
from omni_jax.model import AUDIO_WAVE, OmniModel, check_batch, tokens_per_item
from omni_jax.omni_config import OmniConfig

D = 32
CONFIG = {
    "llm": dict(vocab_size=512, hidden_size=D, intermediate_size=48, num_layers=1, num_heads=4,
                num_kv_heads=2),
    "image": dict(encoder="siglip", adapter="mlp_2x2", adapter_config=dict(out_dim=D),
                  encoder_config=dict(hidden_size=16, intermediate_size=32, num_layers=1,
                                      num_heads=2, image_size=32, patch_size=8),
                  image_size=[32, 32]),
    "video": dict(encoder="shared:image", adapter="mlp", adapter_config=dict(out_dim=D),
                  image_size=[32, 32], num_frames=2),
    "audio": dict(encoder="whisper", adapter="speech", num_frames=100,
                  encoder_config=dict(num_mel_bins=80, d_model=16, encoder_layers=1,
                                      encoder_attention_heads=2, encoder_ffn_dim=32,
                                      max_source_positions=50),
                  adapter_config=dict(in_dim=16, out_dim=D, hidden_dim=32, stack=5)),
}
AUDIO = AudioConfig(chunk_seconds=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("omni")
    manifests = make_fixtures(tmp / "fx", num_images=4, num_audio=3, num_videos=2, num_text=4,
                              use_espeak=False)
    records = {k: [json.loads(line) for line in open(p)] for k, p in manifests.items()}
    for recs in records.values():  # resolve media paths as JsonlSource does
        for r in recs:
            for key in ("images", "audios", "videos"):
                if key in r:
                    r[key] = [[str(tmp / "fx" / f) for f in v] if isinstance(v, list)
                              else str(tmp / "fx" / v) for v in r[key]]
    texts = [json.dumps(r["messages"]) for recs in records.values() for r in recs]
    model_file = train_sentencepiece(texts * 4, 400, str(tmp / "sp"))
    tok = load_tokenizer(TokenizerConfig(path=str(model_file)))
    cfg = OmniConfig.from_dict(CONFIG)
    return cfg, OmniEncoder(cfg, ChatTemplate(tok), audio=AUDIO), records, manifests


def test_each_record_expands_to_its_media_token_count(setup):
    cfg, enc, records, _ = setup
    for recs in records.values():
        ex = enc(recs[0])
        for m, code in (("image", 1), ("video", 2), ("audio", 3)):
            n = len(recs[0].get(m + "s", []))
            assert int(np.sum(ex["modality"] == code)) == n * (tokens_per_item(cfg, m) if n else 0)
            if n:
                assert ex[m].shape[0] == n and ex[m].dtype == np.float32
    img = enc(records["image_caption"][0])["image"]
    assert img.shape == (1, 32, 32, 3) and -1.0 <= img.min() < img.max() <= 1.0
    assert enc(records["speech_asr"][0])["audio"].shape == (1, 80, 100)
    assert enc(records["video_qa"][0])["video"].shape == (1, 2, 32, 32, 3)


def test_packed_media_follow_layout_order_and_feed_the_model(setup):
    cfg, enc, records, _ = setup
    recs = [r for task in ("image_caption", "speech_asr", "video_qa", "image_qa", "text_chat")
            for r in records[task][:2]]
    examples = [packing.shift_example(enc(r)) for r in recs]
    spec = {m: (v["max_items"], tuple(v["shape"]))
            for m, v in media_spec(cfg, {"image": 6, "video": 2, "audio": 2}, AUDIO).items()}
    batches = packing.pack_examples(examples, batch_size=3, seq_len=256, media=spec)
    seen = 0
    for batch in batches:
        next_item = dict.fromkeys(spec, 0)
        for r in range(3):
            for seg in range(1, int(batch["segment_ids"][r].max()) + 1):
                ids = batch["input_ids"][r][batch["segment_ids"][r] == seg]
                j = next(i for i, e in enumerate(examples)
                         if np.array_equal(e["input_ids"], ids))
                seen += 1
                for m in spec:
                    n = len(examples[j].get(m, []))
                    got = batch[m][next_item[m]:next_item[m] + n]
                    np.testing.assert_array_equal(got, examples[j].get(m, got[:0]))
                    next_item[m] += n
        check_batch(cfg, batch)
    assert seen == len(examples)
    model = OmniModel(cfg)
    jb = {k: jax.numpy.asarray(v) for k, v in batches[0].items()}
    params = model.init(jax.random.key(0), jb)
    logits = model.apply(params, jb)["logits"]
    assert logits.shape == (*batches[0]["input_ids"].shape, 512)
    assert bool(np.isfinite(np.asarray(logits)).all())


def test_pipeline_end_to_end_and_budget_errors(setup):
    cfg, enc, records, manifests = setup
    data = {"sources": {"cap": {"path": manifests["image_caption"], "weight": 1.0},
                        "asr": {"path": manifests["speech_asr"], "weight": 1.0}},
            "batch_size": 2, "packing": True, "seq_len": 256,
            "media": media_spec(cfg, {"image": 4, "audio": 4}, AUDIO)}
    it = iter(make_dataset(data, enc, process_index=0, process_count=1))
    first = next(it)
    assert first["image"].shape == (4, 32, 32, 3) and first["audio"].shape == (4, 80, 100)
    assert first["video"].shape == (1, 2, 32, 32, 3)
    check_batch(cfg, first)
    small = dict(data, media=media_spec(cfg, {"image": 1, "audio": 1}, AUDIO), seq_len=512)
    with pytest.raises(ValueError, match=r"batch needs \d+ (image|audio) items but the media "
                                         r"spec allows 1"):
        next(iter(make_dataset(small, enc, process_index=0, process_count=1)))
    with pytest.raises(ValueError, match="no tower for"):
        media_spec(OmniConfig.from_dict({"llm": CONFIG["llm"]}), {"image": 1})
    with pytest.raises(ValueError, match="give 3000 mel frames .* expects 100"):
        OmniEncoder(cfg, enc.template, audio=AudioConfig())
    with pytest.raises(ValueError, match="model has no image tower"):
        OmniEncoder(OmniConfig.from_dict({"llm": CONFIG["llm"]}), enc.template)(
            records["image_caption"][0])


# Ola's chunked dual-encoder audio tower: 1 s chunks (100 mel frames), 3 chunks per item
OLA_AUDIO = dict(
    encoder="ola_audio", adapter="speech", num_chunks=3,
    encoder_config=dict(whisper=CONFIG["audio"]["encoder_config"], chunk_seconds=1, max_chunks=3,
                        beats=dict(embed_dim=8, encoder_embed_dim=8, encoder_layers=1,
                                   encoder_attention_heads=2, encoder_ffn_embed_dim=16,
                                   conv_pos=4, conv_pos_groups=2)),
    adapter_config=dict(in_dim=16 + 8, out_dim=D, hidden_dim=32, stack=10))


def wav_record(seconds, seed):
    """A speech_asr-like record with an inline WAV of `seconds` seconds; returns the waveform."""
    wave = (np.random.default_rng(seed).normal(size=int(16000 * seconds)) * 0.1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format="WAV", subtype="FLOAT")
    msgs = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "what"}]},
            {"role": "assistant", "content": "a sound"}]
    return {"messages": msgs, "audios": [buf.getvalue()]}, wave


def test_long_audio_chunks_through_encoder_batch_and_model(setup):
    cfg_plain, enc_plain, _, _ = setup
    cfg = OmniConfig.from_dict({"llm": CONFIG["llm"], "audio": OLA_AUDIO})
    enc = OmniEncoder(cfg, enc_plain.template, audio=AUDIO)
    (rec, wave), (short, swave) = wav_record(2.5, 0), wav_record(1.2, 1)
    ex = enc(rec)
    per = tokens_per_item(cfg, "audio")
    assert per == 1 + 3 * (50 // 10 + 1) + 1
    assert int(np.sum(ex["modality"] == 3)) == per
    assert ex["audio"].shape == (1, 3, 80, 100) and ex[AUDIO_WAVE].shape == (1, 3, 16000)
    for k in range(3):  # each chunk: its own samples, zero-padded, and its own log-mel
        piece = wave[k * 16000:(k + 1) * 16000]
        np.testing.assert_array_equal(ex[AUDIO_WAVE][0, k, :len(piece)], piece)
        assert not ex[AUDIO_WAVE][0, k, len(piece):].any()
        np.testing.assert_allclose(ex["audio"][0, k], afeat.log_mel(piece, AUDIO), atol=1e-5)
    sx = enc(short)  # 2 chunks + a silence chunk: same token count
    assert int(np.sum(sx["modality"] == 3)) == per and not sx[AUDIO_WAVE][0, 2].any()
    np.testing.assert_allclose(sx["audio"][0, 2], afeat.log_mel(np.zeros(16000, np.float32),
                                                                 AUDIO), atol=1e-6)
    np.testing.assert_array_equal(sx[AUDIO_WAVE][0, 1, :3200], swave[16000:])
    # a 4.5 s clip: 5 chunks, cut to max_chunks=3 as Ola's loader does
    np.testing.assert_array_equal(enc(wav_record(4.5, 2)[0])[AUDIO_WAVE][0].reshape(-1),
                                  wav_record(4.5, 2)[1][:48000])
    spec = {m: (v["max_items"], tuple(v["shape"]))
            for m, v in media_spec(cfg, {"audio": 2}, AUDIO).items()}
    assert spec == {"audio": (2, (3, 80, 100)), AUDIO_WAVE: (2, (3, 16000))}
    examples = [packing.shift_example(e) for e in (ex, sx)]
    (batch,) = packing.pack_examples(examples, batch_size=2, seq_len=64, media=spec)
    np.testing.assert_array_equal(batch[AUDIO_WAVE][:2], np.concatenate(
        [ex[AUDIO_WAVE], sx[AUDIO_WAVE]]))  # layout order
    check_batch(cfg, batch)
    model = OmniModel(cfg)
    jb = {k: jax.numpy.asarray(v) for k, v in batch.items()}
    params = jax.jit(model.init)(jax.random.key(0), jb)
    x, logits, emb = jax.jit(lambda p, b: model.apply(p, b, method=lambda m, b: (
        m.embed_inputs(b), m(b)["logits"], m.encode("audio", b["audio"], b[AUDIO_WAVE]))))(
        params, jb)
    mod = batch["modality"]
    np.testing.assert_allclose(np.asarray(x)[mod == 3], np.asarray(emb).reshape(-1, D),
                               atol=1e-5)
    assert logits.shape == (2, 64, 512) and bool(np.isfinite(np.asarray(logits)).all())


def test_chunked_audio_errors(setup):
    template = setup[1].template
    two = OmniConfig.from_dict({"llm": CONFIG["llm"], "audio": dict(OLA_AUDIO, num_chunks=2)})
    with pytest.raises(ValueError, match=r"audio item of 2.50 s gives 3 chunks of 1 s but the "
                                         r"audio tower takes num_chunks=2"):
        OmniEncoder(two, template, audio=AUDIO)(wav_record(2.5, 0)[0])
    with pytest.raises(ValueError, match=r"expects \(16000, 16000, 160, 80\); set "
                                         r"AudioConfig.chunk_seconds=1 and n_mels=80"):
        OmniEncoder(two, template, audio=AudioConfig(chunk_seconds=2))
    with pytest.raises(ValueError, match=r"n_mels=80"):
        OmniEncoder(two, template, audio=AudioConfig(chunk_seconds=1, n_mels=128))


def test_media_index_keeps_items_right_across_process_blocks(setup):
    """Two processes each pad their own media block; the global batch concatenates them."""
    cfg, enc, records, _ = setup
    exs = [packing.shift_example(enc(r)) for r in records["image_caption"][:3]]
    spec = {"image": (4, (32, 32, 3))}
    blocks = [packing.pad_batch(exs[:1], 2, [256], media=spec, process_index=0),
              packing.pad_batch(exs[1:], 2, [256], media=spec, process_index=1)]
    glob = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
    per = tokens_per_item(cfg, "image")
    assert sorted(set(glob["media_index"][glob["modality"] == 1] // per)) == [0, 4, 5]
    model = OmniModel(cfg)
    jb = {k: jax.numpy.asarray(v) for k, v in glob.items()
          if k in ("input_ids", "modality", "media_index", "image")}
    params = model.init(jax.random.key(0), jb)
    x = np.asarray(model.apply(params, jb, method=OmniModel.embed_inputs))
    img = np.asarray(model.apply(params, "image", jb["image"], method=OmniModel.encode))
    for row, item in ((0, 0), (2, 4), (3, 5)):  # process 1's rows take items 4 and 5
        np.testing.assert_array_equal(x[row][glob["modality"][row] == 1], img[item])
    check_batch(cfg, glob)
    bad = dict(glob, media_index=np.where(glob["modality"] == 1, glob["media_index"] + 8 * per, -1))
    with pytest.raises(ValueError, match=r"media_index of image placeholders spans rows"):
        check_batch(cfg, bad)
    no_index = {k: v for k, v in jb.items() if k != "media_index"}  # the row-major fallback
    y = np.asarray(model.apply(params, no_index, method=OmniModel.embed_inputs))
    assert not np.array_equal(y[2][glob["modality"][2] == 1], img[4])
