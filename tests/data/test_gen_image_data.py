"""Image-out (X-VILA) records -> examples with targets -> batches: decoder-space targets, the
highway's source row, per-row seeds that resume, and clear errors for records that disagree."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from omni_jax.data import packing
from omni_jax.data.gen_image import GenTargets, collate_gen, to_decoder_space
from omni_jax.data.omni import OmniEncoder, media_spec
from omni_jax.data.pipeline import DataConfig, make_dataset
from omni_jax.data.template import ChatTemplate, TemplateConfig
from omni_jax.data.tokenizer import (
    DEFAULT_SPECIAL_TOKENS,
    TokenizerConfig,
    load_tokenizer,
    train_sentencepiece,
)
from omni_jax.omni_config import OmniConfig

K, SHAPE = 3, (8, 8, 1)
CONFIG = {
    "llm": dict(vocab_size=512, hidden_size=32, intermediate_size=48, num_layers=1,
                num_heads=4, num_kv_heads=2),
    "image": dict(encoder="siglip", adapter="mlp_2x2", adapter_config=dict(out_dim=32),
                  encoder_config=dict(hidden_size=16, intermediate_size=32, num_layers=1,
                                      num_heads=2, image_size=32, patch_size=8),
                  image_size=[32, 32]),
}


def png(seed: int, size: int = 16, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def draw(i: int) -> dict:
    return {"id": f"t2i-{i}", "gen_image": png(i),
            "messages": [{"role": "user", "content": "Draw a seven."},
                         {"role": "assistant", "content": [{"type": "gen_image"}]}]}


def copy(i: int, n_images: int = 1, **extra) -> dict:
    parts = [{"type": "image"}] * n_images + [{"type": "text", "text": "Copy it."}]
    return {"id": f"i2i-{i}", "images": [png(100 + i + j) for j in range(n_images)],
            "gen_image": png(200 + i), **extra,
            "messages": [{"role": "user", "content": parts},
                         {"role": "assistant", "content": [{"type": "gen_image"}]}]}


def qa(i: int) -> dict:
    return {"id": f"qa-{i}", "images": [png(300 + i)],
            "messages": [{"role": "user", "content": [{"type": "image"},
                                                      {"type": "text", "text": "What?"}]},
                         {"role": "assistant", "content": "A seven."}]}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("tok") / "sp"
    path = train_sentencepiece(["Draw a seven.", "Copy it.", "What? A seven."] * 20, 300, prefix,
                               special_tokens=(*DEFAULT_SPECIAL_TOKENS, "<gen_image>"))
    tok = load_tokenizer(TokenizerConfig(path=str(path), gen_image_token="<gen_image>"))
    tpl = ChatTemplate(tok, TemplateConfig(default_system_prompt=None, gen_image_tokens=K))
    cfg = OmniConfig.from_dict(CONFIG)
    return OmniEncoder(cfg, tpl, gen=GenTargets(SHAPE, tok.gen_image_id, K))


def reference_target(data: bytes) -> np.ndarray:
    """PIL's own bicubic resize + ITU-R 601 luma, mapped to [-1, 1]: the decoder's space."""
    img = Image.open(io.BytesIO(data)).convert("RGB").resize(SHAPE[:2][::-1], Image.BICUBIC)
    rgb = np.asarray(img, np.float64)
    return ((rgb @ [0.299, 0.587, 0.114])[..., None] / 127.5 - 1).astype(np.float32)


def test_records_encode_their_target_and_highway_source(encoder):
    t2i, i2i, two = encoder(draw(0)), encoder(copy(0)), encoder(copy(1, 2, veh_image=1))
    np.testing.assert_allclose(t2i["gen_image"], reference_target(draw(0)["gen_image"]),
                               atol=1e-6)
    assert t2i["gen_image"].shape == SHAPE and -1 <= t2i["gen_image"].min() < 0
    assert t2i["veh_item"].tolist() == [-1] and i2i["veh_item"].tolist() == [0]
    assert two["veh_item"].tolist() == [1] and len(two["image"]) == 2
    assert encoder(copy(2, veh_image=None))["veh_item"].tolist() == [-1]
    assert "gen_image" not in encoder(qa(0))  # no target: the example is left as it is
    gray = to_decoder_space(np.full((4, 4, 3), 255, np.uint8), (2, 2, 1))
    np.testing.assert_allclose(gray, np.ones((2, 2, 1)), atol=1e-6)  # white -> +1


def test_batches_carry_static_targets_rows_and_resumable_seeds(encoder):
    records = [draw(0), qa(0), copy(0), copy(1, 2, veh_image=1), draw(1), qa(1)]
    cfg = DataConfig(batch_size=3, seq_buckets=(64,), gen_image={"shape": list(SHAPE)},
                     media=media_spec(encoder.config, {"image": 4}), read_threads=0,
                     sources={"all": {"kind": "jsonl", "path": "unused"}})
    ds = make_dataset(cfg, encoder, sources={"all": records})
    it = iter(ds)
    batches = [next(it) for _ in range(4)]
    sources = {}  # target (decoder space) -> the preprocessed image the VEH should carry
    for rec in records:
        if "gen_image" in rec:
            src = rec["images"][rec.get("veh_image", 0)] if "images" in rec else None
            sources[reference_target(rec["gen_image"]).tobytes()] = (
                None if src is None else encoder._pixels([encoder._image(src)], 32)[0])
    checked = 0
    for b in batches:
        assert b["gen_image"].shape == (3, *SHAPE) and b["gen_image_mask"].shape == (3,)
        assert b["gen_seed"].dtype == np.int32 and b["veh_index"].shape == (3,)
        for r in range(3):
            if b["gen_image_mask"][r] == 0:  # a QA row: no target, no source
                assert b["veh_index"][r] == -1 and not b["gen_image"][r].any()
                continue
            key = min(sources, key=lambda k: np.abs(np.frombuffer(k, np.float32) -
                                                    b["gen_image"][r].ravel()).max())
            want = sources[key]
            assert np.abs(np.frombuffer(key, np.float32) - b["gen_image"][r].ravel()).max() \
                < 1e-6
            if want is None:
                assert b["veh_index"][r] == -1
            else:
                np.testing.assert_array_equal(b["image"][b["veh_index"][r]], want)
                checked += 1
    assert checked >= 2
    seeds = np.concatenate([b["gen_seed"] for b in batches])
    assert len(np.unique(seeds)) == len(seeds)  # every row of every batch its own seed
    state = it.get_state()
    after = [next(it)["gen_seed"] for _ in range(2)]
    it2 = iter(ds)
    it2.set_state(state)
    assert all(np.array_equal(a, next(it2)["gen_seed"]) for a in after)


def test_second_process_rows_point_past_the_first_processes_images(encoder):
    """Process 1 of 2: veh_index is a row of the global image array (the processes' local
    arrays concatenated), so its local row is veh_index - max_items."""
    records = [copy(i) for i in range(4)]
    cap = 4
    cfg = DataConfig(batch_size=4, seq_buckets=(64,), gen_image={"shape": list(SHAPE)},
                     media=media_spec(encoder.config, {"image": cap}), read_threads=0,
                     sources={"all": {"kind": "jsonl", "path": "unused"}})
    b = next(iter(make_dataset(cfg, encoder, sources={"all": records}, process_index=1,
                               process_count=2)))
    assert b["veh_index"].tolist() == [cap, cap + 1]  # local rows 0 and 1, offset by 4
    assert b["gen_seed"].tolist() == [2, 3]  # after process 0's rows of the global batch
    for r in range(2):
        target = b["gen_image"][r]
        src = next(rec for rec in records
                   if np.abs(reference_target(rec["gen_image"]) - target).max() < 1e-6)
        np.testing.assert_array_equal(b["image"][b["veh_index"][r] - cap],
                                      encoder._pixels([encoder._image(src["images"][0])],
                                                      32)[0])


def test_collate_points_at_the_global_image_row():
    ex = [{"gen_image": np.zeros(SHAPE, np.float32), "veh_item": np.array([1], np.int32),
           "image": np.zeros((2, 4, 4, 3))},
          {"image": np.zeros((1, 4, 4, 3))},
          {"gen_image": np.ones(SHAPE, np.float32), "veh_item": np.array([0], np.int32),
           "image": np.zeros((1, 4, 4, 3))},
          {"gen_image": np.ones(SHAPE, np.float32), "veh_item": np.array([-1], np.int32)}]
    out = collate_gen(ex, 5, {"shape": SHAPE}, first_image=8)  # process 1 of max_items 8
    assert out["veh_index"].tolist() == [9, -1, 11, -1, -1]
    assert out["gen_image_mask"].tolist() == [1, 0, 1, 1, 0]
    with pytest.raises(ValueError, match="DataConfig.gen_image is not set"):
        collate_gen(ex, 5, {})
    with pytest.raises(ValueError, match=r"expected \(8, 8, 1\)"):
        collate_gen([{"gen_image": np.zeros((4, 4, 1)), "veh_item": np.array([-1])}], 2,
                    {"shape": SHAPE})


def test_bad_records_and_configs_are_clear_errors(encoder):
    no_target = draw(0)
    del no_target["gen_image"]
    with pytest.raises(ValueError, match="has a gen_image part but no 'gen_image' target"):
        encoder(no_target)
    no_part = qa(0) | {"gen_image": png(1)}
    with pytest.raises(ValueError, match="gives a 'gen_image' target but its messages"):
        encoder(no_part)
    with pytest.raises(ValueError, match=r"veh_image=3 must index its 1 image"):
        encoder(copy(0, veh_image=3))
    from omni_jax.data.sources import CorruptMediaError

    with pytest.raises(CorruptMediaError, match="gen_image target unreadable"):
        encoder(draw(0) | {"gen_image": b"not a png"})
    with pytest.raises(ValueError, match="need packing=False"):
        DataConfig(packing=True, gen_image={"shape": [8, 8, 1]})
    with pytest.raises(ValueError, match="gen_image must be one image"):
        encoder(draw(0) | {"gen_image": [png(1), png(2)]})
    for bad in ({"shape": [8, 4, 1]}, {"shape": [8, 8, 2]}, {"size": 8}, {"shape": [8.5, 8, 1]}):
        with pytest.raises(ValueError, match="DataConfig.gen_image must be"):
            DataConfig(gen_image=bad)
    with pytest.raises(ValueError, match="cannot be packed"):
        packing.FirstFitPacker(2, 64).add(packing.shift_example(encoder(draw(0))))
    json.dumps(draw(0)["messages"])  # records stay plain JSON besides their media refs
