"""Omni records -> examples with media -> packed batches whose media follow the layout order."""

import json

import jax
import numpy as np
import pytest

from omni_jax.data import packing
from omni_jax.data.features.config import AudioConfig
from omni_jax.data.fixtures import make_fixtures
from omni_jax.data.omni import OmniEncoder, media_spec
from omni_jax.data.pipeline import make_dataset
from omni_jax.data.template import ChatTemplate
from omni_jax.data.tokenizer import TokenizerConfig, load_tokenizer, train_sentencepiece
from omni_jax.model import OmniModel, check_batch, tokens_per_item
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
