"""Recipes: every stage's trainable patterns match the tiny model, the frozen/trainable split
per stage is the one the papers describe (SEEDS.md), real model sizes, launch scripts."""

import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from omni_jax.omni_config import OmniConfig
from omni_jax.recipes import load_recipe, make_plan
from omni_jax.train.omni_model import OmniLM
from omni_jax.train.stages import FREEZE, StageConfig, label_tree, param_paths

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("ola", "capybara", "openomni", "ovis", "xvila")
ALL = "all"


@pytest.fixture(scope="module")
def recipes():
    """name -> (config, {path: label} per stage) for model=tiny, from an abstract init."""
    out = {}
    for name in (*RECIPES, "ola:order=paper", "demo"):
        spec = name if ":" in name else f"{name}:model=tiny"
        config = load_recipe("demo" if name == "demo" else  # its own small model
                             spec + (",model=tiny" if ":" in name else ""))
        model = OmniLM(OmniConfig.from_dict(config.model.to_dict()))
        batch = {"input_ids": jax.ShapeDtypeStruct((1, 8), np.int32)}
        params = nn.unbox(jax.eval_shape(lambda m=model, b=batch: m.init(jax.random.key(0), b))
                          ["params"])
        paths = jax.tree.leaves(param_paths(params))
        labels = {}
        for stage in config.stage_order:
            s = config.stages[stage]
            sc = StageConfig.from_dict({"name": stage, "trainable": s.trainable,
                                        "lr_groups": s.lr_groups, "losses": s.losses})
            labels[stage] = dict(zip(paths, jax.tree.leaves(label_tree(params, sc))))
        out[name] = (config, model, labels)
    return out


def split(labels: dict[str, str]) -> dict[str, str]:
    """Top-level group -> "all" (every param trainable) | "some" | absent (all frozen)."""
    groups: dict[str, list[bool]] = {}
    for path, lab in labels.items():
        groups.setdefault(path.split("/")[0], []).append(lab != FREEZE)
    return {g: ALL if all(v) else "some" for g, v in groups.items() if any(v)}


def trained(*groups):
    return dict.fromkeys(groups, ALL)


ADAPTERS = ("image_adapter", "video_adapter", "audio_adapter")
EXPECTED = {
    "ola": {  # released code: image-text -> video -> speech, projector alignment before each
        "image_align": trained("image_adapter"),
        "image_text": trained("llm", "image_adapter"),
        "video": trained("llm", "image_adapter", "video_adapter"),
        "speech_align": trained("audio_adapter"),
        "speech": trained("llm", *ADAPTERS),
    },
    "ola:order=paper": {  # abstract: image/text -> speech -> video
        "image_align": trained("image_adapter"),
        "image_text": trained("llm", "image_adapter"),
        "speech_align": trained("audio_adapter"),
        "speech": trained("llm", "image_adapter", "audio_adapter"),
        "video": trained("llm", *ADAPTERS),
    },
    "capybara": {
        "phase1a": trained("image_adapter"),
        "phase1b": trained("llm", "image_encoder", "image_adapter", "video_adapter"),
        "phase1c": trained("llm", "image_encoder", "image_adapter", "video_adapter"),
        "phase2": trained("audio_encoder", "audio_adapter"),  # LLM and vision frozen
        "phase3": trained("llm", "image_encoder", "audio_encoder", *ADAPTERS),
    },
    "openomni": {
        "speech_text": trained("audio_adapter"),
        "image_pretrain": trained("image_adapter"),
        "image_instruct": trained("llm", "image_adapter", "image_encoder"),
        "speech_gen": trained("speech"),  # IV: only the speech generator (LLM frozen)
        "speech_dpo": trained("speech"),  # V: only the generator (its DPO reference frozen)
    },
    "ovis": {
        "s1": {"image_adapter": ALL, "image_encoder": "some"},  # + last ViT layer
        "s2": trained("image_encoder", "image_adapter"),
        "s3": trained("llm", "image_encoder", "image_adapter"),
    },
    "demo": {  # towers from scratch: each trained once, then frozen (Ola keeps them frozen)
        "image_tower": trained("image_encoder", "image_adapter"),
        "image_text": trained("llm", "image_adapter"),
        "audio_tower": trained("audio_encoder", "audio_adapter"),
        "speech": trained("llm", "image_adapter", "audio_adapter"),
        "video": trained("llm", *ADAPTERS),
        "speech_gen": trained("speech"),
        "speech_dpo": trained("speech"),
    },
    "xvila": {
        "x_text_align": trained(*ADAPTERS),
        "interleaved": trained("llm", *ADAPTERS),
        "instruct": trained("llm", *ADAPTERS),
    },
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_stage_splits_follow_the_papers(recipes, name):
    config, _, labels = recipes[name]
    assert tuple(config.stage_order) == tuple(EXPECTED[name])
    for stage, want in EXPECTED[name].items():
        assert split(labels[stage]) == want, (name, stage)
        if name != "demo":
            assert config.stages[stage].steps == 4  # model=tiny: a few steps per stage


def test_plan_counts_trainable_params_and_the_tiny_model_has_every_tower(recipes):
    config, model, labels = recipes["capybara"]
    plans = make_plan(config, model, count_data=False)
    assert [p.name for p in plans] == list(config.stage_order)
    towers = {p.split("/")[0] for p in labels["phase3"]}
    assert towers == {"llm", "image_encoder", "audio_encoder", *ADAPTERS}
    phase3 = plans[-1]
    assert phase3.trainable_params == phase3.total_params > 0
    p2 = plans[config.stage_order.index("phase2")]
    assert 0 < p2.trainable_params < p2.total_params
    assert p2.trainable_groups == ["audio_adapter", "audio_encoder"]


def test_ovis_s1_trains_exactly_the_last_vit_layer(recipes):
    config, _, labels = recipes["ovis"]
    last = config.model.image.encoder_config.num_layers - 1
    vit = {p for p, lab in labels["s1"].items() if lab != FREEZE and p.startswith("image_enc")}
    assert vit and all(p.startswith((f"image_encoder/layers_{last}/", "image_encoder/post_norm/"))
                       for p in vit)
    assert not any(p.startswith(f"image_encoder/layers_{last - 1}/") for p in vit)


def test_openomni_stage3_gives_the_vit_a_lower_lr(recipes):
    config, _, labels = recipes["openomni"]
    s3 = labels["image_instruct"]
    assert {lab for p, lab in s3.items() if p.startswith("image_encoder/")} == {"vit"}
    assert {lab for p, lab in s3.items() if p.startswith("llm/")} == {"train"}
    assert config.stages.image_instruct.lr_groups.vit.lr_scale < 1.0
    assert config.stages.speech_text.optim.lr == 1e-3 and config.stages.image_instruct.optim.lr \
        == 5e-5


def test_openomni_speech_stages_ctc_then_dpo_against_a_frozen_reference(recipes):
    config, _, _ = recipes["openomni"]
    gen, dpo = config.stages.speech_gen, config.stages.speech_dpo
    assert gen.optim.lr == dpo.optim.lr == 5e-4
    assert load_recipe("openomni").stages.speech_gen.epochs == 3.0  # paper: 3 epochs
    assert dict(gen.losses) == {"ctc": 1.0} and dpo.losses.dpo.beta == 0.1
    assert not gen.data.packing and not dpo.data.packing
    plans = {p.name: p for p in make_plan(config, OmniLM(OmniConfig.from_dict(
        config.model.to_dict())), count_data=False)}
    assert plans["speech_dpo"].model.dpo_reference and not plans["speech_gen"].model.dpo_reference
    params = nn.unbox(jax.eval_shape(lambda: plans["speech_dpo"].model.init(
        jax.random.key(0), {"input_ids": jax.ShapeDtypeStruct((1, 8), np.int32)}))["params"])
    sc = StageConfig.from_dict({"name": "v", "trainable": dpo.trainable, "losses": dpo.losses})
    labels = dict(zip(jax.tree.leaves(param_paths(params)),
                      jax.tree.leaves(label_tree(params, sc))))
    assert {lab for p, lab in labels.items() if p.startswith("speech_ref/")} == {FREEZE}
    assert {lab for p, lab in labels.items() if p.startswith("speech/")} == {"train"}
    ar = load_recipe("openomni:model=tiny,speech=ar")
    assert dict(ar.stages.speech_gen.losses) == {"unit_ce": 1.0} and ar.model.speech.mode == "ar"


def test_real_model_sizes():
    from omni_jax.llm.config import LLMConfig

    c05 = load_recipe("ola:model=qwen05b").model
    c7 = load_recipe("capybara:model=qwen7b").model
    assert LLMConfig.from_dict(c05.llm.to_dict()).num_params() == 494_032_768  # Qwen2.5-0.5B
    assert LLMConfig.from_dict(c7.llm.to_dict()).num_params() == 7_615_616_512  # Qwen2.5-7B
    assert c05.image.encoder_config.patch_size == 16  # Ola's so400m variant
    assert c7.image.encoder_config.patch_size == 14 and c7.image.image_size == [448, 448]
    assert c7.audio.encoder_config.d_model == 1280 and c7.audio.num_frames == 3000
    OmniConfig.from_dict(c7.to_dict())  # validates widths / towers


def test_bad_recipe_args():
    with pytest.raises(ValueError, match="unknown recipe 'nope'.*known recipes: capybara"):
        load_recipe("nope:model=tiny")
    with pytest.raises(ValueError, match="unknown model 'huge'"):
        load_recipe("ola:model=huge")
    with pytest.raises(ValueError, match="unknown config arg 'modle'"):
        load_recipe("ovis:modle=tiny")
    with pytest.raises(ValueError, match="unknown order 'random'"):
        load_recipe("ola:model=tiny,order=random")


def test_a_pattern_matching_nothing_is_an_error(recipes):
    config, model, _ = recipes["xvila"]
    config = config.copy_and_resolve_references()
    config.stages.instruct.trainable = ("^llm/", "^audio_adaptor/")
    with pytest.raises(ValueError, match=r"stage 'instruct': trainable pattern '\^audio_adaptor/' "
                                         "matches no parameter"):
        make_plan(config, model, count_data=False)


# ---- launch scripts ---------------------------------------------------------------------------
def sh(script, *args, env=None):
    full = {**os.environ, "DRY_RUN": "1", **(env or {})}
    return subprocess.run(["bash", str(ROOT / "launch" / script), *args], capture_output=True,
                          text=True, env=full, cwd=ROOT, timeout=60)


@pytest.mark.parametrize("script", ["local.sh", "tpu_pod.sh", "gpu_slurm.sh"])
def test_launch_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / "launch" / script)]).returncode == 0


def test_launch_dry_run_commands():
    out = sh("local.sh", "ola:model=tiny", "/tmp/w", "--stage", "video", env={"NUM_DEVICES": "8"})
    assert out.returncode == 0
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=8" in out.stdout
    assert "-m omni_jax.cli.train --config ola:model=tiny --workdir /tmp/w --stage video" \
        in out.stdout
    out = sh("tpu_pod.sh", "ola:model=qwen7b", "gs://b/ola", env={"TPU_NAME": "pod", "ZONE": "z"})
    assert out.returncode == 0
    assert out.stdout.startswith("gcloud compute tpus tpu-vm ssh pod --zone z --worker=all "
                                 "--command ")
    assert "OMNI_DISTRIBUTED=auto" in out.stdout and "gs://b/ola" in out.stdout
    missing = sh("tpu_pod.sh", "ola", "w", env={"TPU_NAME": "", "ZONE": "z"})
    assert missing.returncode != 0 and "set TPU_NAME" in missing.stderr
    env = {"SLURM_JOB_NUM_NODES": "2", "GPUS_PER_NODE": "8", "HEAD_NODE": "n1", "PORT": "999"}
    per_node = sh("gpu_slurm.sh", "ola:model=qwen7b", "/s/ola", env=env)
    assert "OMNI_COORDINATOR_ADDRESS=n1:999 OMNI_NUM_PROCESSES=2\n" in per_node.stdout
    assert "srun --nodes=2 --ntasks-per-node=1 " in per_node.stdout
    per_gpu = sh("gpu_slurm.sh", "ola:model=qwen7b", "/s/ola", env={**env, "MODE": "gpu"})
    assert "OMNI_NUM_PROCESSES=16" in per_gpu.stdout and "CUDA_VISIBLE_DEVICES" in per_gpu.stdout
    assert sh("gpu_slurm.sh", "a", "b", env={"MODE": "x"}).returncode == 2


def test_local_script_runs_the_cli_plan(tmp_path):
    out = sh("local.sh", "ovis:model=tiny", str(tmp_path), "--dry_run",
             env={"DRY_RUN": "0", "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr
    assert "recipe ovis (model tiny): 3 stages" in out.stdout
    assert "stages: s1=planned, s2=planned, s3=planned" in out.stdout


def test_a_stage_with_a_new_loss_is_config_plus_a_registered_function(recipes, tmp_path,
                                                                        monkeypatch):
    (tmp_path / "my_losses.py").write_text(
        "from omni_jax.train.losses import LOSSES, register_loss, next_token_ce\n"
        "@register_loss('ce_twice')\n"
        "def ce_twice(outputs, batch):\n"
        "    loss, metrics = next_token_ce(outputs, batch)\n"
        "    return 2.0 * loss, metrics\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config, model, _ = recipes["ovis"]
    config = config.copy_and_resolve_references()
    config.stages.s3.losses = {"ce": 1.0, "ce_twice": 0.5}
    with pytest.raises(ValueError, match="unknown loss 'ce_twice'"):
        make_plan(config, model, count_data=False)
    config.loss_modules = ("my_losses",)
    plan = make_plan(config, model, count_data=False)
    assert dict(plan[-1].trainer_config.stage.losses) == {"ce": 1.0, "ce_twice": 0.5}
