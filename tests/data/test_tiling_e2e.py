"""Capybara's any-resolution tiling end to end: an image tower with max_tiles turns every image
into its best grid of tiles (up to max_tiles) + a thumbnail, each view one item of the static
tile shape; the record's placeholder is repeated per view; the stage's media budget counts
views; a batch of images of three aspect ratios trains."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from omni_jax.data.features import image as ifeat
from omni_jax.data.fixtures import train_fixture_tokenizer
from omni_jax.data.omni import expand_placeholders
from omni_jax.model import tokens_per_item
from omni_jax.recipes import load_recipe, make_encoder, make_plan, model_of, run

SHAPES = [(32, 96), (96, 32), (64, 64)]  # (height, width): wide, tall, square


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiles")
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
    c = load_recipe("capybara:model=tiny")
    c.model.image.max_tiles = 4
    c.data_root, c.tokenizer.path, c.stage_order = str(root), spm, ("phase1a",)
    c.stages.phase1a.steps, c.stages.phase1a.batch_size = 2, 3
    c.train.peak_flops, c.train.progress_bar, c.train.tensorboard = 1e9, False, False
    return root, c, recs


def test_views_placeholders_and_budget(data):
    root, c, recs = data
    omni = model_of(c).config
    encoder = make_encoder(c, omni)
    tpi = tokens_per_item(omni, "image")
    assert tpi == (32 // 8 // 2) ** 2  # 4 x 4 patches, 2 x 2 reduction per tile
    for rec, (h, w) in zip(recs, SHAPES * 2):
        rows, cols = ifeat.select_grid(h, w, 32, 4)
        assert rows * cols <= 4 and (rows, cols) == {(32, 96): (1, 3), (96, 32): (3, 1),
                                                     (64, 64): (2, 2)}[(h, w)]
        ex = encoder({**rec, "images": [os.path.join(root, rec["images"][0])]})
        views = rows * cols + 1  # tiles + thumbnail
        assert ex["image"].shape == (views, 32, 32, 3)
        assert int((ex["modality"] == 1).sum()) == views * tpi
        assert sorted(set(ex["item_index"][ex["modality"] == 1])) == list(range(views))
    plan = make_plan(c)[0]
    assert plan.data["media"]["image"]["max_items"] == 3 * (4 + 1)
    big = load_recipe("capybara:model=qwen7b")
    assert tokens_per_item(model_of(big).config, "image") == 256  # 448 / 14 = 32; 1024 -> 256


def test_expand_placeholders_in_parts_and_text():
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"},
                                         {"type": "image"}]},
            {"role": "user", "content": "x <image> y"}]
    out = expand_placeholders(msgs, "<image>", [2, 1, 3])
    assert [p["type"] for p in out[0]["content"]] == ["image", "image", "text", "image"]
    assert out[1]["content"] == "x <image><image><image> y"
    with pytest.raises(ValueError, match="more image placeholders than its 1 image"):
        expand_placeholders(msgs, "<image>", [1])


def test_three_aspect_ratios_train(data, tmp_path):
    root, c, _ = data
    lines = []
    assert run(c, str(tmp_path / "run"), echo=lines.append) == {"phase1a": "trained"}
    loss = [ln for ln in lines if ": loss " in ln]
    assert loss and "nan" not in loss[0]
