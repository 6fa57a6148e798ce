"""Ola's two image views end to end: an image tower with lowres_size gives every image a low-res
view and a high-res view, each sized by Ola's rules then gray-padded onto its static canvas;
tokens follow SEEDS' formula; records become batches with image + image_lowres; the media
budget ships both; images of three aspect ratios train the ola recipe's image stage; the
model's embeddings are the two-view adapter over the encoder's outputs of both views."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from omni_jax.adapters.lgap import OlaProjector
from omni_jax.data.features import image as ifeat
from omni_jax.data.features.config import ImageConfig
from omni_jax.data.fixtures import train_fixture_tokenizer
from omni_jax.data.pipeline import make_dataset
from omni_jax.encoders.vision import SiglipVisionEncoder
from omni_jax.model import IMAGE_LOWRES, OmniModel, check_batch, media_shapes, tokens_per_item
from omni_jax.omni_config import OmniConfig, TowerConfig
from omni_jax.recipes import format_plan, load_recipe, make_encoder, make_plan, model_of, run

SHAPES = [(40, 120), (120, 40), (50, 50)]  # (height, width): wide, tall, square
GRAY = (127 / 255 - 0.5) / 0.5  # Ola's pad value after its (x - 0.5) / 0.5 normalization


def seeds_count(low, high):
    (h, w), (hh, ww) = low, high
    return 3 + (h // 32) * (w // 32 + 1) + (hh // 32) * (ww // 32 + 1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ola_views")
    rng = np.random.default_rng(0)
    recs = []
    for i, (h, w) in enumerate(SHAPES * 2):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / f"img{i}.png")
        recs.append({"id": f"r{i}", "images": [f"img{i}.png"], "messages": [
            {"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": "Describe the picture."}]},
            {"role": "assistant", "content": f"A picture of shape {h} by {w}."}]})
    (root / "image_caption.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    spm = train_fixture_tokenizer({"image_caption": str(root / "image_caption.jsonl")}, 300,
                                  root / "spm", repeat=20)
    c = load_recipe("ola:model=tiny")
    c.data_root, c.tokenizer.path, c.stage_order = str(root), spm, ("image_align",)
    c.stages.image_align.steps, c.stages.image_align.batch_size = 2, 3
    c.train.peak_flops, c.train.progress_bar, c.train.tensorboard = 1e9, False, False
    return root, c, recs


@pytest.mark.parametrize("size", ["tiny", "qwen05b", "qwen7b"])
def test_token_counts_follow_seeds_for_the_static_canvases(size):
    omni = model_of(load_recipe(f"ola:model={size}")).config
    t = omni.image
    assert t.two_views and media_shapes(omni)[IMAGE_LOWRES] == (*t.lowres_size, 3)
    n = tokens_per_item(omni, "image")
    assert n == seeds_count(t.lowres_size, t.image_size)
    assert n == {"tiny": 11, "qwen05b": 759, "qwen7b": 759}[size]  # 3 + 12*13 + 24*25 real


def test_canvas_views_follow_olas_sizing():
    cfg = ImageConfig()
    rng = np.random.default_rng(1)
    small = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
    low, high = ifeat.ola_canvas_views(small, cfg, (32, 32), (64, 64))
    assert low.shape == (32, 32, 3) and high.shape == (64, 64, 3)
    assert not np.isclose(low, GRAY).all(axis=-1).any()  # low-res: area ~32^2, fills it
    inner = np.zeros((64, 64), bool)
    inner[22:42, 22:42] = True  # high-res: native 20 x 20, centred, not upscaled
    assert np.isclose(high[~inner], GRAY).all()
    np.testing.assert_array_equal(high[22:42, 22:42], ifeat.normalize(small, cfg))
    wide = rng.integers(0, 255, (40, 120, 3), dtype=np.uint8)
    low, high = ifeat.ola_canvas_views(wide, cfg, (32, 32), (64, 64))
    # the view that overflows its canvas shrinks, aspect kept: 64 wide, 21 high, centred
    assert ifeat.fit_within(40, 120, 64, 64) == (21, 64)
    rows = ~np.isclose(high, GRAY).all(axis=(1, 2))
    assert rows.sum() == 21 and rows[21:42].all()
    with pytest.raises(ValueError, match="canvases must be positive"):
        ifeat.ola_canvas_views(wide, cfg, (0, 32), (64, 64))


def test_a_record_becomes_a_batch_of_both_static_views(data):
    root, c, recs = data
    omni = model_of(c).config
    encoder = make_encoder(c, omni)
    tpi = tokens_per_item(omni, "image")
    for rec in recs[:3]:
        ex = encoder({**rec, "images": [os.path.join(root, rec["images"][0])]})
        assert ex["image"].shape == (1, 64, 64, 3) and ex[IMAGE_LOWRES].shape == (1, 32, 32, 3)
        assert int((ex["modality"] == 1).sum()) == tpi == 11
        assert np.isclose(ex["image"][0, 0, 0], GRAY).all()  # padded corner (all 3 shapes)
    plan = make_plan(c, count_data=False)[0]
    media = plan.data["media"]
    assert media["image"] == {"max_items": 3, "shape": [64, 64, 3], "tokens": tpi}
    assert media[IMAGE_LOWRES] == {"max_items": 3, "shape": [32, 32, 3]}  # shares the budget
    assert "image_lowres 3 x (32, 32, 3)" in format_plan(c, [plan])
    batch = next(iter(make_dataset(plan.data, encoder)))
    assert batch["image"].shape == (3, 64, 64, 3) and batch[IMAGE_LOWRES].shape == (3, 32, 32, 3)
    check_batch(omni, batch)
    with pytest.raises(ValueError, match="needs 'image_lowres'"):
        check_batch(omni, {k: v for k, v in batch.items() if k != IMAGE_LOWRES})


def test_three_aspect_ratios_train(data, tmp_path):
    root, c, _ = data
    lines = []
    assert run(c, str(tmp_path / "run"), echo=lines.append) == {"image_align": "trained"}
    loss = [ln for ln in lines if ": loss " in ln]
    assert loss and "nan" not in loss[0]


def test_model_embeddings_are_the_adapter_over_both_views(data):
    omni = model_of(data[1]).config
    t, vis = omni.image, omni.image.encoder_config
    rng = np.random.default_rng(2)
    high = jnp.asarray(rng.uniform(-1, 1, (2, *t.image_size, 3)), jnp.float32)
    low = jnp.asarray(rng.uniform(-1, 1, (2, *t.lowres_size, 3)), jnp.float32)
    n = tokens_per_item(omni, "image")
    ids = jnp.full((1, 2 * n + 3), 5, jnp.int32)
    mod = jnp.zeros_like(ids).at[0, 2:2 + 2 * n].set(1)
    batch = {"input_ids": ids, "modality": mod, "image": high, IMAGE_LOWRES: low}
    model = OmniModel(omni)
    params = nn.unbox(model.init(jax.random.key(0), batch))
    feats: dict = {}
    got = model.apply(params, "image", high, None, feats, low, method=OmniModel.encode)
    p = params["params"]
    enc = lambda x: SiglipVisionEncoder(vis).apply({"params": p["image_encoder"]}, x)  # noqa: E731
    g_low, g_high = vis.grid(*t.lowres_size), vis.grid(*t.image_size)
    want = OlaProjector(t.adapter_config).apply({"params": p["image_adapter"]}, enc(low), g_low,
                                                 enc(high), g_high)
    assert got.shape == (2, n, omni.llm.hidden_size)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # the highway's features are the high-res view's; the LLM input rows are these embeddings
    np.testing.assert_array_equal(np.asarray(feats["image"][0]), np.asarray(enc(high)))
    x = model.apply(params, batch, method=OmniModel.embed_inputs)
    np.testing.assert_array_equal(np.asarray(x[0, 2:2 + 2 * n]),
                                  np.asarray(got.reshape(-1, got.shape[-1])))
    one_view = OlaProjector(t.adapter_config).apply({"params": p["image_adapter"]}, enc(low),
                                                    g_low)
    assert one_view.shape[1] != n  # the check can fail: one view has fewer tokens


def test_bad_two_view_configs_fail():
    base = dict(encoder="siglip", encoder_config={"patch_size": 16}, image_size=[64, 64],
                lowres_size=[32, 32], adapter_config={"out_dim": 32})
    TowerConfig.from_dict("image", {**base, "adapter": "ola_lgap"})
    with pytest.raises(ValueError, match="lowres_size needs a two-view adapter"):
        TowerConfig.from_dict("image", {**base, "adapter": "mlp"})
    with pytest.raises(ValueError, match="only for an image tower without max_tiles"):
        TowerConfig.from_dict("image", {**base, "adapter": "ola_lgap", "max_tiles": 4})
    omni = OmniConfig.from_dict({"llm": {"vocab_size": 64, "hidden_size": 32,
                                         "intermediate_size": 64, "num_layers": 1,
                                         "num_heads": 4, "num_kv_heads": 2},
                                 "image": {**base, "adapter": "mlp_2x2", "lowres_size": None}})
    batch = {"input_ids": np.zeros((1, 4), np.int32), "image": np.zeros((1, 64, 64, 3)),
             IMAGE_LOWRES: np.zeros((1, 32, 32, 3))}
    with pytest.raises(ValueError, match="takes one view per image"):
        check_batch(omni, batch)


@pytest.mark.parametrize("hw, want", [((100, 100), (320, 320)),  # area raised to 288^2
                                      ((1080, 1920), (320, 640)),  # lowered to 480^2
                                      ((300, 400), (320, 384))])  # in range: x64 rounding
def test_ola_video_frame_sizing(hw, want):
    """SEEDS: each frame's area clamped to [288^2, 480^2], sides multiples of 64; then fitted
    (aspect kept) and gray-centred on the video tower's static canvas."""
    from omni_jax.data.features.config import ImageConfig

    cfg = ImageConfig()
    got = ifeat.ola_frame_size(*hw, cfg)
    assert got == want and all(s % 64 == 0 for s in got)
    assert got[0] * got[1] <= 480 ** 2 and (got[0] * got[1] >= 288 ** 2 or hw == (300, 400))
    frames = [np.full((*hw, 3), 200, np.uint8)] * 2
    out = ifeat.ola_frames(frames, cfg, (640, 640))
    assert out.shape == (2, 640, 640, 3)
    gray = (127 / 255 - 0.5) / 0.5
    rows = np.abs(out[0, :, 320, 0] - gray) > 1e-6  # the frame's rows in the centre column
    assert int(rows.sum()) == min(want[0], 640 * want[0] // max(want))
