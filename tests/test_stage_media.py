"""Stage-aware batches: a stage ships and encodes only the media its data mixture holds — a
captions-only stage of a model with image, video and audio towers carries only images, and the
audio and video towers are not in its compiled step."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from omni_jax.data.pipeline import make_dataset
from omni_jax.omni_config import OmniConfig
from omni_jax.recipes import format_plan, load_recipe, make_encoder, make_plan
from omni_jax.train.omni_model import OmniLM


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from omni_jax.data.fixtures import make_fixtures, train_fixture_tokenizer

    root = tmp_path_factory.mktemp("stage_media")
    manifests = make_fixtures(root / "fx", num_images=4, num_audio=2, num_videos=1, num_text=2,
                              use_espeak=False)
    c = load_recipe("capybara:model=tiny")
    c.data_root, c.tokenizer.path = str(root / "fx"), train_fixture_tokenizer(
        manifests, 400, root / "spm")
    return c


def test_budgets_cover_only_the_mixture_modalities(setup):
    c = setup
    model = OmniLM(OmniConfig.from_dict(c.model.to_dict()))
    plans = {p.name: p for p in make_plan(c, model, count_data=False)}
    assert sorted(plans["phase1a"].data["media"]) == ["image"]  # captions only
    assert sorted(plans["phase2"].data["media"]) == ["audio"]  # ASR only
    assert sorted(plans["phase3"].data["media"]) == ["audio", "image", "video"]
    # padded rows (one record each): the budget is batch x the most items one record holds
    assert plans["phase1a"].data["media"]["image"]["max_items"] == c.stages.phase1a.batch_size
    assert "media per batch: image 4 x (32, 32, 3)" in format_plan(c, list(plans.values()))
    # unknown data (no manifest, nothing declared): every tower keeps the safe bound
    c2 = load_recipe("capybara:model=tiny")
    c2.stages.phase1a.data.sources.image_caption.modalities = None
    plan = make_plan(c2, model, count_data=False)[0]
    assert sorted(plan.data["media"]) == ["audio", "image", "video"]


def test_a_captions_stage_ships_and_encodes_only_images(setup):
    c = setup
    omni = OmniConfig.from_dict(c.model.to_dict())
    model = OmniLM(omni)
    plan = make_plan(c, model, count_data=False)[0]
    batch = next(iter(make_dataset(plan.data, make_encoder(c, omni))))
    assert "image" in batch and not {"audio", "video", "audio_wave"} & set(batch)
    params = nn.unbox(model.init(jax.random.key(0), {"input_ids": batch["input_ids"][:1]})[
        "params"])

    def convs(b):  # SigLIP's patch conv is 1 convolution, Whisper's front end 2 more
        hlo = jax.jit(lambda p: model.apply(p, b)["logits"]).lower(params).as_text()
        return hlo.count("stablehlo.convolution")

    assert convs(batch) == 1
    with_audio = {**batch, "audio": np.zeros((1, 80, 100), np.float32)}
    assert convs(with_audio) == 3  # the check can fail: an audio batch runs Whisper's convs
