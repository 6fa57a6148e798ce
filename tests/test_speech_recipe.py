"""OpenOmni's speech stages end to end on the tiny model: IV (CTC, only the generator trains,
the LLM frozen) then V (DPO against a frozen copy of the generator taken at DPO start), on the
offline speech fixtures; the AR variant plans and trains too."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from omni_jax.recipes import final_params, load_recipe, make_plan, run
from omni_jax.train.stages import param_paths

STAGES = ("speech_gen", "speech_dpo")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from omni_jax.data.fixtures import make_fixtures, train_fixture_tokenizer
    from omni_jax.data.speech_fixtures import make_speech_fixtures

    root = tmp_path_factory.mktemp("speech_recipe")
    manifests = make_fixtures(root / "fx", num_images=6, num_audio=2, num_videos=1, num_text=2,
                              use_espeak=False)
    speech = make_speech_fixtures(root / "fx", manifests)
    spm = train_fixture_tokenizer(manifests, 400, root / "spm")
    return root, str(root / "fx"), spm, speech


def config(fx: str, spm: str, mode: str = "ctc"):
    c = load_recipe(f"openomni:model=tiny,speech={mode}")
    c.data_root, c.tokenizer.path, c.stage_order = fx, spm, STAGES
    for s in STAGES:
        c.stages[s].steps = 3
        c.stages[s].optim.lr = 3e-3
    c.train.peak_flops, c.train.progress_bar, c.train.tensorboard = 1e9, False, False
    c.train.log_every = 1
    return c


def flat(params) -> dict[str, np.ndarray]:
    return dict(zip(jax.tree.leaves(param_paths(params)),
                    (np.asarray(x) for x in jax.tree.leaves(params))))


def test_speech_stages_train_only_the_generator(data):
    root, fx, spm, _ = data
    c = config(fx, spm)
    lines = []
    status = run(c, str(root / "run"), echo=lines.append)
    assert status == {"speech_gen": "trained", "speech_dpo": "trained"}, lines
    from omni_jax.omni_config import OmniConfig
    from omni_jax.train.omni_model import OmniLM

    model = OmniLM(OmniConfig.from_dict(c.model.to_dict()), c.train.get("fused_head_chunk"))
    plans = {p.name: p for p in make_plan(c, model, count_data=False)}
    stage_model = plans["speech_gen"].model  # initialised jitted, as the trainer does
    init = flat(jax.jit(lambda r: nn.unbox(stage_model.init(
        r, {"input_ids": np.zeros((1, 8), np.int32)})["params"]))(jax.random.key(c.train.seed)))
    gen = flat(jax.device_get(final_params(str(root / "run"), plans["speech_gen"], model)))
    dpo = flat(jax.device_get(final_params(str(root / "run"), plans["speech_dpo"], model)))
    for k, v in gen.items():  # stage IV: the LLM and towers are frozen, the generator moved
        if k.startswith("speech/"):
            continue
        np.testing.assert_array_equal(v, init[k], err_msg=k)
    assert any(not np.array_equal(v, init[k]) for k, v in gen.items() if k.startswith("speech/"))
    # stage V: the reference is stage IV's generator, bitwise; the policy moved on from it
    ref = {k[len("speech_ref/"):]: v for k, v in dpo.items() if k.startswith("speech_ref/")}
    pol = {k[len("speech/"):]: v for k, v in dpo.items() if k.startswith("speech/")}
    assert ref and sorted(ref) == sorted(pol)
    for k, v in ref.items():
        np.testing.assert_array_equal(v, gen["speech/" + k], err_msg=k)
    assert any(not np.array_equal(v, ref[k]) for k, v in pol.items())
    for k, v in dpo.items():
        if not k.startswith("speech"):
            np.testing.assert_array_equal(v, gen[k], err_msg=k)
    losses = [line for line in lines if "loss" in line]
    assert any(line.startswith("stage speech_dpo: loss 0.6931") for line in losses), losses


def test_ar_variant_trains(data):
    root, fx, spm, _ = data
    c = config(fx, spm, "ar")
    c.stage_order = ("speech_gen",)
    lines = []
    assert run(c, str(root / "run_ar"), echo=lines.append) == {"speech_gen": "trained"}
    assert any("loss" in line for line in lines)


def test_speech_stage_without_speech_records_fails_clearly(data):
    root, fx, spm, _ = data
    c = config(fx, spm)
    c.stage_order = ("speech_gen",)
    c.stages.speech_gen.data.sources = {"image_qa": {"kind": "jsonl", "path": "image_qa.jsonl",
                                                     "weight": 1.0}}
    with pytest.raises(ValueError, match="speech"):
        run(c, str(root / "run_bad"), echo=lambda s: None)
