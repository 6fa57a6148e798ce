"""The train CLI end to end on the tiny model with media (fixture images, video frames, audio):
a 2-stage Capybara run (phase1b -> phase2) where phase2 starts from phase1b's final params,
finished stages are skipped on re-run, and bad input exits 2 with a clear message."""

import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from omni_jax.omni_config import OmniConfig
from omni_jax.recipes import final_params, load_recipe, make_plan, run
from omni_jax.train.omni_model import OmniLM
from omni_jax.train.stages import param_paths

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("phase1b", "phase2")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Fixture manifests + a SentencePiece tokenizer trained on their text."""
    from omni_jax.data.fixtures import make_fixtures, train_fixture_tokenizer

    root = tmp_path_factory.mktemp("cli")
    manifests = make_fixtures(root / "fx", num_images=8, num_audio=6, num_videos=2, num_text=8,
                              use_espeak=False)
    return root, str(root / "fx"), train_fixture_tokenizer(manifests, 400, root / "spm")


def overrides(fx: str, spm: str) -> list[str]:
    return [f"--config.data_root={fx}", f"--config.tokenizer.path={spm}",
            f"--config.stage_order={STAGES!r}", "--config.stages.phase1b.steps=2",
            "--config.stages.phase2.steps=2", "--config.stages.phase1b.optim.lr=0.01",
            "--config.train.peak_flops=1e9", "--config.train.progress_bar=False",
            "--config.train.tensorboard=False", "--config.train.log_every=1"]


def cli(*args: str) -> subprocess.CompletedProcess:
    # cheap XLA:CPU compiles (about half the CPU time of these tiny runs)
    fast = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": fast}
    return subprocess.run([sys.executable, "-m", "omni_jax.cli.train", *args], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=600)


def in_process_config(fx: str, spm: str):
    c = load_recipe("capybara:model=tiny")
    c.data_root, c.tokenizer.path, c.stage_order = fx, spm, STAGES
    c.stages.phase1b.steps = c.stages.phase2.steps = 2
    c.stages.phase1b.optim.lr = 0.01
    c.train.peak_flops, c.train.progress_bar, c.train.tensorboard = 1e9, False, False
    return c


def flat(params) -> dict[str, np.ndarray]:
    return dict(zip(jax.tree.leaves(param_paths(params)),
                    (np.asarray(x) for x in jax.tree.leaves(params))))


@pytest.fixture(scope="module")
def trained(data):
    """Run phase1b alone (--stage), then the recipe (phase1b skipped, phase2 restored from it)."""
    root, fx, spm = data
    workdir = str(root / "run")
    first = cli("--config", "capybara:model=tiny", "--workdir", workdir, "--stage", "phase1b",
                *overrides(fx, spm))
    assert first.returncode == 0, first.stderr[-3000:]
    second = cli("--config", "capybara:model=tiny", "--workdir", workdir, *overrides(fx, spm))
    assert second.returncode == 0, second.stderr[-3000:]
    return workdir, first.stdout, second.stdout


def test_stages_chain_from_the_previous_final_params(data, trained):
    _, fx, spm = data
    workdir, first, second = trained
    assert "stages: phase1b=trained" in first
    assert "stage phase1b: loss " in first and "(step 2)" in first  # logged every step
    assert "stage phase1b: final checkpoint exists, skipped" in second
    assert "stage phase2: 2 steps, from stage phase1b's final parameters" in second
    assert "stages: phase1b=skipped, phase2=trained" in second
    config = in_process_config(fx, spm)
    model = OmniLM(OmniConfig.from_dict(config.model.to_dict()))
    plans = make_plan(config, model)
    p1, p2 = (flat(final_params(workdir, p, model)) for p in plans)
    keep = ("llm", "audio_encoder", "audio_adapter")  # jit only these: XLA drops the rest
    init = flat(jax.jit(lambda: {k: v for k, v in nn.unbox(model.init(
        jax.random.key(config.train.seed), {"input_ids": np.zeros((1, 8), np.int32)})[
        "params"]).items() if k in keep})())
    frozen2 = [k for k in p1 if not k.startswith("audio_")]  # phase2: LLM and vision frozen
    for k in frozen2:  # phase2 starts from phase1b's final params and leaves these alone
        np.testing.assert_array_equal(p2[k], p1[k], err_msg=k)
    llm = [k for k in frozen2 if k.startswith("llm/")]
    assert max(float(np.max(np.abs(p1[k] - init[k]))) for k in llm) > 1e-3  # phase1b trained
    audio = [k for k in p1 if k.startswith("audio_")]
    for k in audio:  # frozen in phase1b: still the init (other XLA flags here: rounding only)
        np.testing.assert_allclose(p1[k], init[k], rtol=0, atol=1e-6, err_msg=k)
    assert any(not np.array_equal(p2[k], p1[k]) for k in audio)  # phase2 trained the audio side


def test_rerun_skips_finished_stages(data, trained):
    _, fx, spm = data
    lines = []
    status = run(in_process_config(fx, spm), trained[0], echo=lines.append)
    assert status == {"phase1b": "skipped", "phase2": "skipped"}
    assert sum("skipped" in line for line in lines) == 2


def test_bad_input_is_a_clear_error(data, tmp_path):
    _, fx, spm = data
    config = in_process_config(fx, spm)
    with pytest.raises(ValueError, match=r"unknown stage 'phase9'; recipe 'capybara' has stages"):
        run(config, str(tmp_path), stage="phase9")
    with pytest.raises(ValueError, match="stage 'phase2' starts from the final parameters of "
                                         "stage 'phase1b', which has not finished"):
        run(config, str(tmp_path), stage="phase2")
    config.tokenizer.path = ""
    with pytest.raises(ValueError, match="no tokenizer: set --config.tokenizer.path"):
        run(config, str(tmp_path))
    config = in_process_config(fx, spm)
    config.stages.phase2.trainable = ("^audio_encoder/", "^speech_tower/")
    with pytest.raises(ValueError, match=r"stage 'phase2': trainable pattern '\^speech_tower/' "
                                         "matches no parameter"):
        run(config, str(tmp_path), dry_run=True)
    bad = cli("--config", "capybara:model=tiny", "--workdir", str(tmp_path), "--stage", "p9")
    assert bad.returncode == 2
    assert "error: unknown stage 'p9'; recipe 'capybara' has stages ['phase1a'," in bad.stderr


def test_export_hf_writes_the_last_stages_llm(data, trained, tmp_path):
    from transformers import Qwen2ForCausalLM

    from omni_jax.cli import check_logits
    from omni_jax.convert.qwen2 import params_to_hf
    from omni_jax.recipes import export_llm

    _, fx, spm = data
    config = in_process_config(fx, spm)
    export_llm(config, trained[0], str(tmp_path / "hf"))
    model = OmniLM(OmniConfig.from_dict(config.model.to_dict()))
    last = final_params(trained[0], make_plan(config, model)[-1], model)
    want = params_to_hf(model.config.llm, {"params": jax.device_get(last["llm"])})
    got = Qwen2ForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    for k, v in want.items():
        np.testing.assert_array_equal(got[k].numpy(), v, err_msg=k)
    assert check_logits.main(["--hf", str(tmp_path / "hf"), "--seq", "8"]) == 0
    with pytest.raises(ValueError, match="stage 'phase2' has not finished"):
        export_llm(config, str(tmp_path / "empty"), str(tmp_path / "x"))
