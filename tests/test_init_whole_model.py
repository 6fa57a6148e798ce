"""Whole-model init (config.init.model): stage 1 of the ola recipe starts from an imported Ola
release (a tiny random checkpoint in Ola's layout -> import_ola -> save_ola): every part the
checkpoint holds (llm, encoders, adapters) equals it bitwise, the rest (a video adapter the
release lacks) is fresh; per-part entries win over it; a checkpoint that does not fit the model
fails with one ValueError listing every problem."""

import functools
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "convert"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "encoders"))
from test_ola_import import HEADS, write_checkpoint  # noqa: E402

from omni_jax.convert import registry  # noqa: E402
from omni_jax.convert.ola import config_dict, import_ola, save_ola  # noqa: E402
from omni_jax.convert.tree import flatten  # noqa: E402
from omni_jax.omni_config import OmniConfig  # noqa: E402
from omni_jax.recipes import load_recipe, make_plan  # noqa: E402
from omni_jax.recipes.init import load_init  # noqa: E402
from omni_jax.recipes.plan import example_batch  # noqa: E402
from omni_jax.train.omni_model import OmniLM  # noqa: E402
from omni_jax.train.trainer import Trainer  # noqa: E402


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    d = tmp_path_factory.mktemp("ola_release")
    write_checkpoint(d)
    config, params, hf = import_ola(str(d / "ola"), str(d / "large-v3.pt"), str(d / "BEATs.pt"),
                                    image_size=(64, 64), num_chunks=2, vision_heads=HEADS)
    save_ola(str(d / "native"), config, params, hf)
    return d, config, params


def recipe_of(config: OmniConfig):
    """The tiny ola recipe with its model built from the imported release's config: Ola's two
    views and a video tower (whose adapter the release does not hold)."""
    c = load_recipe("ola:model=tiny")
    model = config_dict(config)
    model["image"]["lowres_size"] = [32, 32]
    model["video"] = {"encoder": "shared:image", "adapter": "ola_lgap", "num_frames": 2,
                      "adapter_config": {"out_dim": config.llm.hidden_size},
                      "image_size": [32, 32]}
    c.model = ConfigDict(model)
    c.audio_features.n_mels = config.audio.encoder_config.whisper.num_mel_bins
    c.stage_order = ("image_align",)
    return c


def stage1_params(c, omni):
    """Stage 1's starting parameters, made as recipes.run makes them (Trainer.restore_or_init
    with config.init's parts)."""
    plan = make_plan(c, OmniLM(omni), count_data=False)[0]
    trainer = Trainer(plan.trainer_config, plan.model)
    parts = functools.partial(load_init, c.init.to_dict(), omni)
    state = trainer.restore_or_init(example_batch(plan), None, parts=parts)
    return jax.device_get(state["params"])


def abstract(omni):
    return nn.unbox(jax.eval_shape(lambda: OmniLM(omni).init(
        jax.random.key(0), {"input_ids": jax.ShapeDtypeStruct((1, 8), np.int32)}))["params"])


def test_stage1_starts_from_the_whole_release_bitwise(release):
    d, config, params = release
    c = recipe_of(config)
    c.init.model = str(d / "native")
    omni = OmniConfig.from_dict(c.model.to_dict())
    got = stage1_params(c, omni)
    ckpt = params["params"]
    assert set(ckpt) == {"llm", "image_encoder", "image_adapter", "audio_encoder",
                         "audio_adapter"}
    for part, tree in ckpt.items():
        mine, want = flatten(got[part]), flatten(tree)
        assert set(mine) == set(want), part
        for k, v in want.items():
            np.testing.assert_array_equal(mine[k], v, err_msg=f"{part}/{k}")
    # the part the release lacks starts fresh: the seed's init, not the image adapter's copy
    fresh = flatten(nn.unbox(OmniLM(omni).init(jax.random.key(c.train.seed), {
        "input_ids": jnp.zeros((1, 8), jnp.int32)})["params"])["video_adapter"])
    vid, img = flatten(got["video_adapter"]), flatten(ckpt["image_adapter"])
    assert set(vid) == set(img)
    assert any(not np.array_equal(vid[k], img[k]) for k in vid)
    for k, v in fresh.items():  # the seed's init (jit vs eager: 1 ulp apart)
        np.testing.assert_allclose(vid[k], v, rtol=1e-6, atol=1e-8, err_msg=f"video_adapter/{k}")
    # the host path (no shardings) reads the same values
    host = load_init({"model": str(d / "native")}, omni, abstract(omni))
    for k, v in flatten(host).items():
        np.testing.assert_array_equal(v, flatten({p: got[p] for p in host})[k], err_msg=k)


def test_per_part_entries_win_over_the_whole_model(release, tmp_path):
    d, config, params = release
    llm = jax.tree.map(lambda x: np.asarray(x) + 1.0, params["params"]["llm"])
    registry.save_native(str(tmp_path / "llm"), "qwen2", config.llm, {"params": llm})
    omni = OmniConfig.from_dict(recipe_of(config).model.to_dict())
    out = load_init({"model": str(d / "native"), "llm": str(tmp_path / "llm")}, omni,
                    abstract(omni))
    for k, v in flatten(llm).items():
        np.testing.assert_array_equal(flatten(out["llm"])[k], v, err_msg=k)
    np.testing.assert_array_equal(  # the other parts still from the release
        flatten(out["image_adapter"])["proj1/kernel"],
        flatten(params["params"]["image_adapter"])["proj1/kernel"])


def test_a_mismatching_release_fails_with_one_message(release, tmp_path):
    d, config, _ = release
    c = recipe_of(config)
    c.model.llm.intermediate_size = 48
    c.model.image.encoder_config.num_heads = 2  # same shapes, another meaning
    omni = OmniConfig.from_dict(c.model.to_dict())
    tree = abstract(omni)
    tree["audio_adapter"] = {**tree["audio_adapter"],
                             "extra": jax.ShapeDtypeStruct((3,), np.float32)}
    with pytest.raises(ValueError, match=(
            r"(?s)init.model = .*native.* \(ola\) does not match the model:"
            r".*llm.intermediate_size: checkpoint 64, config 48"
            r".*image.encoder_config.num_heads: checkpoint 4, config 2"
            r".*missing audio_adapter/extra \(3,\)"
            r".*llm/layers_0/mlp/.*: checkpoint shape \(32, 64\), model \(32, 48\)")):
        load_init({"model": str(d / "native")}, omni, tree)
    omni_ok = OmniConfig.from_dict(recipe_of(config).model.to_dict())
    registry.save_native(str(tmp_path / "llm"), "qwen2", config.llm, {"params": {}})
    with pytest.raises(ValueError, match="holds a qwen2 checkpoint; expected a whole model"):
        load_init({"model": str(tmp_path / "llm")}, omni_ok, abstract(omni_ok))
    with pytest.raises(ValueError, match="init.model: '/nonexistent' does not exist"):
        load_init({"model": "/nonexistent"}, omni_ok, abstract(omni_ok))
    with pytest.raises(ValueError, match="unknown parts"):
        load_init({"whole": str(d / "native")}, omni_ok, abstract(omni_ok))
