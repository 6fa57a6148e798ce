"""The demo curriculum (omni_jax/configs/recipes/demo.py) shortened: the small omni_digits config,
a few steps per stage. Every stage's loss falls (first vs last logged loss) and the held-out
(test split: unseen images and voices) evaluation runs for every stage and yields its metrics.
A held-out accuracy threshold is not asserted yet: 30 steps from scratch answer image QA at
chance (25% of 8 held-out records measured, seed 0)."""

import os
import re

import pytest

from omni_jax.cli import demo as cli
from omni_jax.configs.recipes import demo as recipe
from omni_jax.recipes import run

STEPS = 0.1  # x the recipe's steps: 30 / 30 / 30 / 20 / 8
LOSS = re.compile(r"stage (\w+): loss ([\d.]+) \(step (\d+)\) -> ([\d.]+) \(step (\d+)\)")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from omni_jax.speech.units import UnitTokenizer

    root = str(tmp_path_factory.mktemp("demo_curriculum"))
    data = os.path.join(root, "data")
    cli.build_data(data, "small", echo=lambda s: None)
    train = os.path.join(data, "train")
    units_dir = os.path.join(train, "units")
    c = recipe.get_config(f"units={UnitTokenizer.load(units_dir).vocab_size},steps={STEPS}")
    c.tokenizer.path = cli.train_tokenizer(train, int(c.model.llm.vocab_size),
                                           os.path.join(data, "spm"))
    cli.write_self_asr(train, units_dir, recipe.SELF_ASR)
    c.data_root, c.speech_units.dir = train, units_dir
    c.train.progress_bar, c.train.tensorboard, c.train.log_every = False, False, 5
    c.train.peak_flops = 1e9
    lines: list[str] = []
    status = run(c, os.path.join(root, "train"), echo=lines.append)
    return root, c, status, lines


def test_every_stage_trains_and_its_loss_falls(trained):
    _, c, status, lines = trained
    assert status == dict.fromkeys(c.stage_order, "trained"), lines
    losses = {m[1]: (float(m[2]), float(m[4])) for m in map(LOSS.match, lines) if m}
    assert sorted(losses) == sorted(c.stage_order), lines
    for stage, (first, last) in losses.items():
        assert last < first, f"stage {stage}: loss {first} -> {last}"


def test_held_out_evaluation_of_every_stage(trained):
    root, c, _, _ = trained
    table = cli.evaluate(c, os.path.join(root, "train"), os.path.join(root, "data", "test"),
                         os.path.join(root, "eval"), 8, list(c.stage_order), echo=lambda s: None)
    assert list(table) == list(c.stage_order)
    for stage in cli.STAGE_TASKS:
        row = table[stage]
        assert "image_qa_accuracy" in row or stage == "speech_gen", (stage, row)
        for name, value in row.items():
            assert value is None or 0.0 <= value <= (10.0 if "wer" in name else 1.0), (name, row)
    assert {"asr_wer", "spoken_image_qa_accuracy"} <= set(table["speech"])
    assert {"video_qa_accuracy", "video_spoken_qa_accuracy"} <= set(table["video"])
    assert "dpo_preference_accuracy" in table["speech_dpo"], table["speech_dpo"]
    print(cli.format_table(table))
