"""TowerConfig.short_clips="drop": a short clip's blank frames stay out of the LLM's sequence.
A clip brings only its own frames' tokens, through training batches (packing's media_index) and
prompt batches (collate_prompts); the logits equal those of a model whose num_frames is the
clip's length, so no blank frame and no other clip's rows leak in."""

import io

import jax
import numpy as np
import pytest
from PIL import Image

from omni_jax.data import packing
from omni_jax.data.omni import VIDEO_FRAMES, OmniEncoder, media_spec
from omni_jax.data.pipeline import DataConfig
from omni_jax.data.template import ChatTemplate
from omni_jax.data.tokenizer import TokenizerConfig, load_tokenizer, train_sentencepiece
from omni_jax.infer.omni import collate_prompts, prompt_from_record, user_record
from omni_jax.model import OmniModel, check_batch, frame_tokens, tokens_per_item
from omni_jax.omni_config import OmniConfig

D, FRAMES = 16, 5


def _config(short_clips: str = "drop", num_frames: int = FRAMES, **video) -> OmniConfig:
    return OmniConfig.from_dict({
        "llm": dict(vocab_size=320, hidden_size=D, intermediate_size=32, num_layers=2,
                    num_heads=2, num_kv_heads=1),
        "image": dict(encoder="siglip", adapter="mlp", adapter_config=dict(out_dim=D),
                      encoder_config=dict(hidden_size=8, intermediate_size=16, num_layers=1,
                                          num_heads=2, image_size=16, patch_size=8),
                      image_size=[16, 16]),
        "video": {**dict(encoder="shared:image", adapter="mlp", adapter_config=dict(out_dim=D),
                         image_size=[16, 16], num_frames=num_frames, short_clips=short_clips),
                  **video}})


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), np.uint8)
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    texts = ["How many digits are shown?", "What is the last digit?", "three five"] * 20
    model_file = train_sentencepiece(texts, 300, str(tmp_path_factory.mktemp("sp") / "sp"))
    template = ChatTemplate(load_tokenizer(TokenizerConfig(path=str(model_file))))
    clips = [[_png(10 * c + f) for f in range(n)] for c, n in enumerate((3, FRAMES, 4))]
    records = [{"messages": [{"role": "user", "content": [{"type": "video"}, {
        "type": "text", "text": q}]}, {"role": "assistant", "content": "three five"}],
        "videos": [clip]} for clip, q in zip(clips, ["How many digits are shown?",
                                                       "What is the last digit?"] * 2)]
    model = OmniModel(_config())
    batch = {"input_ids": np.zeros((1, 4), np.int32), "modality": np.zeros((1, 4), np.int32)}
    video = np.zeros((1, FRAMES, 16, 16, 3), np.float32)
    params = {"params": {
        **model.init(jax.random.PRNGKey(0), batch)["params"],
        **model.init(jax.random.PRNGKey(1), "video", video, method=OmniModel.encode)["params"],
        **model.init(jax.random.PRNGKey(2), "image", video[:, 0],
                     method=OmniModel.encode)["params"]}}
    return template, records, params


def _alone(template, record, params, frames: int) -> np.ndarray:
    """Logits of one record on a model whose num_frames is the clip's own length."""
    enc = OmniEncoder(_config("pad", frames), template)
    ex = enc(record)
    assert ex["video"].shape[1] == frames and np.all(ex["video"] != 0)  # no blank frame
    batch = {"input_ids": ex["input_ids"][None], "modality": ex["modality"][None],
             "video": ex["video"]}
    return np.asarray(OmniModel(_config("pad", frames)).apply(params, batch)["logits"][0])


def test_a_clip_brings_its_own_frames_tokens_only(parts):
    template, records, _ = parts
    cfg = _config()
    enc = OmniEncoder(cfg, template)
    per = frame_tokens(cfg)
    assert per * FRAMES == tokens_per_item(cfg, "video") == enc.counts["video"]
    pad = OmniEncoder(_config("pad"), template)
    for rec, n in zip(records, (3, FRAMES, 4)):
        ex = enc(rec)
        assert int(np.sum(ex["modality"] == 2)) == n * per
        assert VIDEO_FRAMES not in ex
        np.testing.assert_array_equal(ex["video"], pad(rec)["video"])  # the tower: as "pad"
        assert not np.any(ex["video"][0, n:]) and np.all(ex["video"][0, :n] != 0)
        media = enc.media(rec)
        assert media[VIDEO_FRAMES].tolist() == [n]
        assert enc.token_counts(media) == {"video": [n * per]}


def test_training_batch_equals_each_clip_on_a_model_of_its_length(parts):
    template, records, params = parts
    cfg = _config()
    enc = OmniEncoder(cfg, template)
    examples = [packing.shift_example(enc(r)) for r in records]
    spec = media_spec(cfg, {"video": 4})  # one spare item: zero rows stay unused
    assert spec["video"]["tokens"] == tokens_per_item(cfg, "video")
    data = DataConfig(sources={}, media=spec)
    batch = packing.pad_batch(examples, 3, [128], 0, {"item_index": -1}, data.media)
    assert batch["video"].shape[0] == 4
    rows = batch["media_index"][batch["modality"] == 2]
    per = frame_tokens(cfg)
    full = tokens_per_item(cfg, "video")
    # clip k's placeholders take rows k * full ... k * full + its own frames' tokens
    want = np.concatenate([k * full + np.arange(n * per) for k, n in enumerate((3, FRAMES, 4))])
    np.testing.assert_array_equal(rows, want)
    check_batch(cfg, batch)
    logits = np.asarray(OmniModel(cfg).apply(params, batch)["logits"])
    for r, (rec, n) in enumerate(zip(records, (3, FRAMES, 4))):
        want = _alone(template, rec, params, n)[:-1]  # the shifted example drops the last
        # measured 6e-8
        np.testing.assert_allclose(logits[r, :want.shape[0]], want, rtol=1e-6, atol=1e-6)


def test_packed_rows_and_other_hosts(parts):
    """Clips packed into shared rows, and a second process's rows (offset by its items)."""
    template, records, _ = parts
    cfg = _config()
    examples = [packing.shift_example(OmniEncoder(cfg, template)(r)) for r in records]
    spec = DataConfig(sources={}, media=media_spec(cfg, {"video": 3})).media
    full, per = tokens_per_item(cfg, "video"), frame_tokens(cfg)
    for host in (0, 1):
        packer = packing.FirstFitPacker(1, 384, 0, {"item_index": -1}, spec, host)
        assert all(packer.add(ex) for ex in examples)
        batch = packer.emit()
        rows = batch["media_index"][batch["modality"] == 2]
        want = np.concatenate([(3 * host + k) * full + np.arange(n * per)
                               for k, n in enumerate((3, FRAMES, 4))])
        np.testing.assert_array_equal(rows, want)
    pad = _config("pad")  # whole items: rows as before, with or without the tokens per item
    ex = [packing.shift_example(OmniEncoder(pad, template)(r)) for r in records]
    spec = DataConfig(sources={}, media=media_spec(pad, {"video": 3})).media
    with_tokens = packing.pad_batch(ex, 3, [128], 0, {"item_index": -1}, spec)
    spec = {"video": spec["video"][:2]}
    without = packing.pad_batch(ex, 3, [128], 0, {"item_index": -1}, spec)
    np.testing.assert_array_equal(with_tokens["media_index"], without["media_index"])
    assert (with_tokens["media_index"] >= 0).sum() == 3 * full


def test_prompt_batch_equals_each_clip_alone(parts):
    template, records, params = parts
    cfg = _config()
    enc = OmniEncoder(cfg, template)
    text = user_record("What is the last digit?")
    prompts = [prompt_from_record(enc, {**r, "messages": r["messages"][:1]}) for r in records]
    prompts.insert(1, prompt_from_record(enc, text))  # a row with no video between
    assert all(("media_index" in p) == (i != 1) for i, p in enumerate(prompts))
    with pytest.raises(ValueError, match="need tokens per item"):
        collate_prompts(prompts, 0)
    batch = collate_prompts(prompts, 0, enc.counts)
    check_batch(cfg, batch)
    seg = batch["segment_ids"]
    batch["positions"] = np.maximum(np.cumsum(seg, axis=1) - 1, 0)
    logits = np.asarray(OmniModel(cfg).apply(params, batch)["logits"])[:, -1]
    for i, (rec, n) in enumerate(zip(records, (3, FRAMES, 4))):
        rec = {**rec, "messages": rec["messages"][:1]}
        alone = OmniEncoder(_config("pad", n), template)
        p = prompt_from_record(alone, rec)
        want = np.asarray(OmniModel(_config("pad", n)).apply(params, p)["logits"])[0, -1]
        np.testing.assert_allclose(logits[i + (i > 0)], want, rtol=1e-6, atol=1e-6)  # 4e-8


def test_drop_needs_the_media_index_and_per_frame_tokens(parts):
    template, records, _ = parts
    cfg = _config()
    p = prompt_from_record(OmniEncoder(cfg, template), {**records[0],
                                                        "messages": records[0]["messages"][:1]})
    with pytest.raises(ValueError, match="needs the media_index"):
        check_batch(cfg, {k: v for k, v in p.items() if k != "media_index"})
    odd = dict(p, modality=p["modality"].copy())
    odd["modality"][0, np.argmax(odd["modality"][0] == 2)] = 0  # one placeholder short
    with pytest.raises(ValueError, match="whole number of frames"):
        check_batch(cfg, odd)
    with pytest.raises(ValueError, match="short_clips='drop' needs an adapter"):
        _config(adapter="ola_lgap")
    shifted = dict(p, media_index=np.where(p["media_index"] >= 0, p["media_index"] + 4, -1))
    with pytest.raises(ValueError, match="starts a clip inside an item"):  # a spec without tokens
        check_batch(cfg, {**shifted, "video": np.concatenate([p["video"]] * 2)})
    ex = {"input_ids": np.zeros(6, np.int32), "modality": np.full(6, 2, np.int32),
          "item_index": np.zeros(6, np.int32)}
    with pytest.raises(ValueError, match="has 6 placeholders but an item gives 4"):
        packing.media_index(ex, {}, {"video": 4})
    with pytest.raises(ValueError, match="tokens: > 0"):
        DataConfig(sources={}, media={"video": {"max_items": 1, "shape": [1], "tokens": 0}})
    with pytest.raises(ValueError, match="tokens: > 0"):
        DataConfig(sources={}, media={"audio_wave": {"max_items": 1, "shape": [1], "tokens": 2}})


def test_paper_size_drop():
    """capybara at qwen7b with short_clips="drop": whole frames per item, the media spec's
    tokens per item, one clip's rows at the full size (no compute)."""
    from omni_jax.recipes.plan import model_of
    from omni_jax.recipes.registry import load_recipe

    c = load_recipe("capybara:model=qwen7b")
    c.model.video.short_clips = "drop"
    cfg = model_of(c).config
    full = tokens_per_item(cfg, "video")
    assert frame_tokens(cfg) * cfg.video.num_frames == full
    assert media_spec(cfg, {"video": 2})["video"]["tokens"] == full
    n = 3 * frame_tokens(cfg)  # a 3-frame clip, then a whole one
    ex = {"input_ids": np.zeros(n + full, np.int32), "modality": np.full(n + full, 2, np.int32),
          "item_index": np.repeat(np.int32([0, 1]), [n, full])}
    rows = packing.media_index(ex, {"video": 2}, {"video": full})
    np.testing.assert_array_equal(rows[:n], 2 * full + np.arange(n))
    np.testing.assert_array_equal(rows[n:], 3 * full + np.arange(full))
