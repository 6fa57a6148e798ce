"""The demo curriculum (omni_jax/configs/recipes/demo.py) shortened: omni_digits' "ci" config
(every image task on 400 train images, 4 records of the others), image_tower TOWER_STEPS and
image_text IMAGE_STEPS steps, 0.1 x the recipe's steps for the rest. Every stage's loss falls
(first vs last logged loss), no record is dropped as too long, the image tower alone names
held-out digits and image QA on the held-out test split (unseen images) beats its chance level
(the best media-blind answer per question), and the evaluation runs for every stage and yields
its metrics."""

import os
import re
import zlib

import numpy as np
import pytest

from omni_jax.cli import demo as cli
from omni_jax.configs.recipes import demo as recipe
from omni_jax.eval import towers
from omni_jax.recipes import run

STEPS = 0.1  # x the recipe's steps: 30 / 45 / 60 / 45 / 45 / 40 / 8, then raised to
TOWER_STEPS = 150  # image_tower (batch 128)
IMAGE_STEPS = 250  # image_text (batch 64: the recipe's)
MARGIN = 0.3  # accuracy - chance, held out: measured 0.40 (83.8% vs 43.8%) at 250 steps and at
# 350 on the image_tower's frozen tower; 0.22 when the tower trained with the LLM in image_text
TOWER_MARGIN = 0.5  # the tower's digit accuracy - chance, held out: measured 0.63 (77.8% vs
# 14.8%, 81 what-digit questions)
LOSS = re.compile(r"stage (\w+): loss ([\d.]+) \(step (\d+)\) -> ([\d.]+) \(step (\d+)\)")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from omni_jax.speech.units import UnitTokenizer

    root = str(tmp_path_factory.mktemp("demo_curriculum"))
    data = os.path.join(root, "data")
    cli.build_data(data, "ci", echo=lambda s: None)
    train = os.path.join(data, "train")
    units_dir = os.path.join(train, "units")
    c = recipe.get_config(f"units={UnitTokenizer.load(units_dir).vocab_size},steps={STEPS}")
    c.tokenizer.path = cli.train_tokenizer(train, int(c.model.llm.vocab_size),
                                           os.path.join(data, "spm"))
    cli.write_self_asr(train, units_dir, recipe.SELF_ASR, recipe.SELF_ASR_PERTURB)
    c.data_root, c.speech_units.dir = train, units_dir
    c.stages.image_tower.steps, c.stages.image_text.steps = TOWER_STEPS, IMAGE_STEPS
    c.train.progress_bar, c.train.tensorboard, c.train.log_every = False, False, 5
    c.train.peak_flops = 1e9
    lines: list[str] = []
    status = run(c, os.path.join(root, "train"), echo=lines.append)
    return root, c, status, lines


def _check_self_asr(train: str, manifest: str, units_dir: str, perturb: dict) -> int:
    """Every self-listening wav says one rendering, each record has its own id, and a cut copy
    is as long as its own draw (seeded by its id) -> the number of cut copies."""
    import json

    import soundfile as sf

    from omni_jax.speech.augment import UnitPerturb, perturb_frames, unit_spans
    from omni_jax.speech.vocoder import MelTableVocoder

    with open(manifest) as f:
        rows = [json.loads(line) for line in f]
    sources = {}
    for task in ("speech_response", "speech_dpo"):
        with open(os.path.join(train, f"{task}.jsonl")) as f:
            sources.update({f"{recipe.SELF_ASR}-{json.loads(x)['id']}": json.loads(x)
                            for x in f})
    assert len({r["id"] for r in rows}) == len(rows) == len(sources)
    said: dict[str, set] = {}
    for r in rows:
        said.setdefault(r["audios"][0], set()).add(tuple(sources[r["id"]]["speech_units"]))
        assert r["messages"][-1]["content"] == sources[r["id"]]["messages"][-1]["content"]
    assert all(len(units) == 1 for units in said.values())  # one rendering per wav file
    hop = MelTableVocoder.load(units_dir).hop_length
    spec = UnitPerturb(**{k: v for k, v in perturb.items() if k != "share"})
    base = os.path.dirname(manifest)
    cut = [r for r in rows if r["audios"][0].endswith(".cut.wav")]
    for r in rows:
        rng = np.random.default_rng(zlib.crc32(r["id"].encode()))
        assert (r in cut) == bool(perturb["share"] and rng.random() < perturb["share"])
        if r in cut:
            units = np.asarray(sources[r["id"]]["speech_units"])
            frames = perturb_frames(units, spec, rng)
            starts, ends = unit_spans(units.size, hop)
            assert sf.info(os.path.join(base, r["audios"][0])).frames == np.sum(
                ends[frames] - starts[frames])
    return len(cut)


def test_each_self_listening_wav_says_its_own_transcript(trained):
    """speech_response and speech_dpo records share id numbers: their self-listening wavs must
    not (one overwrote the other: 26 of 243 wavs were heard with another record's answer)."""
    root, c, _, _ = trained
    train = os.path.join(root, "data", "train")
    _check_self_asr(train, os.path.join(train, f"{recipe.SELF_ASR}.jsonl"), c.speech_units.dir,
                    recipe.SELF_ASR_PERTURB)


def test_perturbed_self_listening(trained, tmp_path):
    """With a share perturbed, those records hear their own cut copy of their rendering."""
    import shutil

    root, c, _, _ = trained
    train = os.path.join(root, "data", "train")
    for task in ("speech_response", "speech_dpo"):
        shutil.copy(os.path.join(train, f"{task}.jsonl"), tmp_path)
    perturb = {"share": 0.5, "drop_run": 0.2, "shorten": 0.3, "lengthen": 0.2}
    path = cli.write_self_asr(str(tmp_path), c.speech_units.dir, recipe.SELF_ASR, perturb)
    assert _check_self_asr(train, path, c.speech_units.dir, perturb) > 0
    stamp = os.path.getmtime(path)
    assert cli.write_self_asr(str(tmp_path), c.speech_units.dir, recipe.SELF_ASR,
                              perturb) == path and os.path.getmtime(path) == stamp  # reused
    off = {**perturb, "share": 0.0}  # other settings: written again
    cli.write_self_asr(str(tmp_path), c.speech_units.dir, recipe.SELF_ASR, off)
    assert _check_self_asr(train, path, c.speech_units.dir, off) == 0
    with pytest.raises(ValueError, match="unknown keys"):
        cli.write_self_asr(str(tmp_path), c.speech_units.dir, recipe.SELF_ASR, {"drop": 0.1})


def test_every_stage_trains_and_its_loss_falls(trained):
    _, c, status, lines = trained
    assert status == dict.fromkeys(c.stage_order, "trained"), lines
    losses = {m[1]: (float(m[2]), float(m[4])) for m in map(LOSS.match, lines) if m}
    assert sorted(losses) == sorted(c.stage_order), lines
    for stage, (first, last) in losses.items():
        assert last < first, f"stage {stage}: loss {first} -> {last}"
    assert not [ln for ln in lines if "dropped as longer" in ln], lines


def test_image_qa_beats_chance_on_held_out_images(trained):
    from omni_jax.eval.runner import evaluate_stage

    root, c, _, _ = trained
    report = evaluate_stage(c, os.path.join(root, "train"), "image_text",
                            [os.path.join(root, "data", "test", "image_qa.jsonl")], None,
                            batch_size=32)
    m = report["metrics"]["image_qa_accuracy"]
    print({k: m[k] for k in ("accuracy", "chance", "count", "by_question")})
    assert m["count"] == 160  # 80 unseen test images x 2 questions
    assert m["accuracy"] >= m["chance"] + MARGIN, m
    # the image tower alone (its image_bow classifier, no LLM) on the what-digit questions
    t = towers.tower_image(c, os.path.join(root, "train"), "image_tower",
                           os.path.join(root, "data", "test", "image_qa.jsonl"), None)
    print({k: t[k] for k in ("accuracy", "chance", "count")})
    assert t["count"] > 40 and t["accuracy"] >= t["chance"] + TOWER_MARGIN, t


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
    assert 0.0 <= table["audio_tower"]["tower_asr_wer"] <= 10.0, table["audio_tower"]
    assert 0.0 <= table["image_tower"]["tower_image_accuracy"] <= 1.0, table["image_tower"]
    assert {"video_qa_accuracy", "video_spoken_qa_accuracy"} <= set(table["video"])
    assert "dpo_preference_accuracy" in table["speech_dpo"], table["speech_dpo"]
    print(cli.format_table(table))


def test_build_data_refuses_an_export_of_other_data(tmp_path):
    import json

    (tmp_path / "export.json").write_text(json.dumps({"config": "ci", "splits": {}}))
    with pytest.raises(ValueError, match="another --workdir"):  # 1.1.0 wrote no version
        cli.build_data(str(tmp_path), "ci", echo=lambda s: None)
