"""The evaluate CLI end to end: a tiny OpenOmni run (stage IV, the CTC speech generator, 2
steps on the fixture set), then `python -m omni_jax.cli.evaluate --workdir --data` on a
manifest set with good records plus a corrupt image, an empty wav, a silent wav, a placeholder
mismatch and an unknown task: exit 0, metrics with the right counts computed from the model's
answers, the bad records listed with reasons. Unit level: the metrics follow the answers
(patched generation: references -> 1.0 / WER 0, wrong answers -> 0.0 / WER 1)."""

import json
import os
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from omni_jax.eval import metrics as M
from omni_jax.eval import runner
from omni_jax.eval import style as S
from omni_jax.eval import tasks as T
from omni_jax.recipes import load_run_config

ROOT = Path(__file__).resolve().parents[2]
STAGE = "speech_gen"


def cli(module: str, *args: str, fast: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if fast:  # cheap XLA:CPU compiles
        env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 " \
                           "--xla_llvm_disable_expensive_passes=true"
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=600)


def _wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.asarray(samples, "<i2").tobytes())


def _read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _absolute(rec: dict, base: str) -> dict:
    out = dict(rec)
    for key in ("images", "audios", "videos"):
        if key in out:
            out[key] = [os.path.join(base, r) for r in out[key]]
    return out


def _write(path: Path, recs: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Fixture data + tokenizer; OpenOmni tiny stage IV trained 2 steps; the eval set."""
    from omni_jax.data.fixtures import make_fixtures, train_fixture_tokenizer
    from omni_jax.data.speech_fixtures import make_speech_fixtures

    root = tmp_path_factory.mktemp("evaluate")
    fx = root / "fx"
    manifests = make_fixtures(fx, num_images=4, num_audio=2, num_videos=1, num_text=4,
                              use_espeak=False)
    speech = make_speech_fixtures(fx, manifests)
    spm = train_fixture_tokenizer(manifests, 400, root / "spm", repeat=8)  # as test_chat_cli
    manifests.update(speech)
    workdir = str(root / "run")
    res = cli("omni_jax.cli.train", "--config", "openomni:model=tiny", "--workdir", workdir,
              f"--config.data_root={fx}", f"--config.tokenizer.path={spm}",
              "--config.stage_order=('speech_gen',)", "--config.stages.speech_gen.steps=2",
              "--config.train.peak_flops=1e9", "--config.train.progress_bar=False",
              "--config.train.tensorboard=False", fast=True)
    assert res.returncode == 0 and "stages: speech_gen=trained" in res.stdout, res.stderr[-3000:]
    # the eval set: good records (absolute media paths) + bad ones, and the vocoder in units/
    ev = root / "evalset"
    ev.mkdir()
    shutil.copytree(manifests["units_dir"], ev / "units")
    qa = [_absolute(r, str(fx)) for r in _read(manifests["image_qa"])]
    asr = [_absolute(r, str(fx)) for r in _read(manifests["speech_asr"])]
    (ev / "broken.png").write_bytes(b"")
    _wav(ev / "empty.wav", np.zeros(0))
    _wav(ev / "silent.wav", np.zeros(8000))
    spoken = [{"id": f"spoken{k}", "task": "spoken_image_qa", "images": qa[k]["images"],
               "audios": asr[k]["audios"], "messages": [
                   {"role": "user", "content": [{"type": "image"}, {"type": "audio"}]},
                   qa[k]["messages"][-1]]} for k in range(2)]
    bad = [
        {**qa[0], "id": "bad_image", "task": "image_qa", "images": [str(ev / "broken.png")]},
        {**asr[0], "id": "empty_wav", "task": "speech_asr", "audios": [str(ev / "empty.wav")]},
        {**asr[1], "id": "silent_wav", "task": "speech_asr",
         "audios": [str(ev / "silent.wav")]},
        {**qa[1], "id": "mismatch", "task": "image_qa", "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                         {"type": "text", "text": "Which is larger?"}]},
            {"role": "assistant", "content": "The first."}]},
        {**qa[2], "id": "caption", "task": "image_caption"},
    ]
    _write(ev / "image_qa.jsonl", qa)
    _write(ev / "speech_asr.jsonl", asr)
    _write(ev / "mixed.jsonl", spoken[:1] + bad + spoken[1:])
    for name in ("speech_response", "speech_dpo"):
        _write(ev / f"{name}.jsonl", [_absolute(r, str(fx))
                                      for r in _read(manifests[name])])
    return root, workdir, ev, {"qa": qa, "asr": asr}


def test_cli_reports_metrics_and_skips_bad_records(trained):
    root, workdir, ev, good = trained
    res = cli("omni_jax.cli.evaluate", "--workdir", workdir, "--data", str(ev), fast=True)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((Path(workdir) / "eval" / f"{STAGE}.json").read_text())
    m = report["metrics"]
    assert report["stage"] == STAGE and report["speech_generator_trained"] and report["vocoder"]
    counts = {k: v["count"] for k, v in m.items()}
    assert counts == {"image_qa_accuracy": 4, "asr_wer": 2, "spoken_image_qa_accuracy": 2,
                      "speech_roundtrip_wer": 4, "speech_roundtrip_wer_ref": 4,
                      "dpo_preference_accuracy": 4, "expressive_style_accuracy": 4}, counts
    for name in ("image_qa_accuracy", "spoken_image_qa_accuracy"):  # from the model's answers
        ans = m[name]["answers"]
        assert m[name]["value"] == M.accuracy([a["prediction"] for a in ans],
                                              [a["reference"] for a in ans])["accuracy"]
    refs = [r["messages"][-1]["content"] for r in good["asr"]]
    assert [a["reference"] for a in m["asr_wer"]["answers"]] == refs
    assert m["asr_wer"]["ref_words"] == sum(len(M.normalize_words(r)) for r in refs)
    assert m["asr_wer"]["value"] == M.word_error_rate(
        refs, [a["prediction"] for a in m["asr_wer"]["answers"]])["wer"]
    pairs = m["dpo_preference_accuracy"]["pairs"]
    assert m["dpo_preference_accuracy"]["value"] == np.mean(
        [p["chosen"] > p["rejected"] for p in pairs])
    assert all(np.isfinite([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]))
    style = m["expressive_style_accuracy"]
    for cue, c in style["cues"].items():  # each calibrated rule sits between its classes
        if "rule" in c:
            r, sign = c["rule"], M.STYLE_CUES[cue][0]
            assert sign * r["expressive_mean"] > sign * r["threshold"] > sign * r["neutral_mean"]
    assert style["cue"] in style["cues"] and style["rule"] == style["cues"][style["cue"]]["rule"]
    assert style["reference_accuracy"] == max(c.get("reference_accuracy", -1)
                                              for c in style["cues"].values())
    skipped = {s["id"]: s for s in report["skipped"]}
    assert set(skipped) == {"bad_image", "empty_wav", "silent_wav", "mismatch", "caption"}
    assert "image item unreadable" in skipped["bad_image"]["reason"]
    assert "zero-length audio" in skipped["empty_wav"]["reason"]
    assert "silent audio" in skipped["silent_wav"]["reason"]
    assert "placeholder mismatch: 2 image placeholder(s)" in skipped["mismatch"]["reason"]
    assert "unknown task 'image_caption'" in skipped["caption"]["reason"]
    assert {s["line"] for s in skipped.values()} == {2, 3, 4, 5, 6}  # lines of mixed.jsonl
    assert all(s["source"].endswith("mixed.jsonl") for s in skipped.values())
    assert report["records"] == {"read": 21, "evaluated": 16, "skipped": 5}
    assert "image_qa_accuracy" in res.stdout and "5 skipped" in res.stdout


def test_metrics_follow_the_answers(trained, monkeypatch):
    _, workdir, ev, _ = trained
    config = load_run_config(workdir)
    data = [str(ev / "image_qa.jsonl"), str(ev / "speech_asr.jsonl"), str(ev / "mixed.jsonl"),
            str(ev / "speech_dpo.jsonl"), str(ev / "speech_response.jsonl")]
    monkeypatch.setattr(runner.Evaluator, "answers",
                        lambda self, prepared: [p.reference for p in prepared])
    monkeypatch.setattr(runner.Evaluator, "dpo_logliks",
                        lambda self, ex: ([0.0] * len(ex), [-1.0] * len(ex)))
    report = runner.evaluate_stage(config, workdir, None, data)
    right = report["metrics"]
    assert right["image_qa_accuracy"]["value"] == 1.0
    assert right["spoken_image_qa_accuracy"]["value"] == 1.0
    assert right["asr_wer"]["value"] == 0.0 and right["asr_wer"]["edits"] == 0
    assert right["dpo_preference_accuracy"]["value"] == 1.0
    # the round trip speaks the (reference) answers with the trained generator + vocoder and
    # transcribes the audio with the same (patched) model: its own words back
    trip = right["speech_roundtrip_wer"]
    assert trip["count"] == 4 and trip["silent"] == 0, trip
    assert trip["value"] == 0.0 and right["speech_roundtrip_wer_ref"]["value"] == 0.0
    assert trip["ref_words"] == sum(len(M.normalize_words(a["reference"]))
                                    for a in trip["answers"]) > 0
    style = right["expressive_style_accuracy"]
    assert style["count"] == 4 and len(style["values"]) == 4
    rule = M.StyleRule(**style["rule"])
    assert style["value"] == np.mean([v is not None and rule.is_expressive(v)
                                      for v in style["values"]])
    monkeypatch.setattr(S, "eval_style", lambda *a: {})  # no speech generation below
    monkeypatch.setattr(runner.Evaluator, "answers",
                        lambda self, prepared: ["zzz"] * len(prepared))
    monkeypatch.setattr(runner.Evaluator, "dpo_logliks",
                        lambda self, ex: ([-1.0] * len(ex), [0.0] * len(ex)))
    wrong = runner.evaluate_stage(config, workdir, None, data[:4], max_records=1)["metrics"]
    assert wrong["image_qa_accuracy"]["value"] == 0.0
    assert wrong["image_qa_accuracy"]["count"] == 1  # max_records per task
    assert wrong["asr_wer"]["value"] == 1.0  # one substitution + (n - 1) deletions per ref
    assert wrong["dpo_preference_accuracy"]["value"] == 0.0


def test_bad_flags_exit_2(trained, tmp_path):
    _, workdir, ev, _ = trained
    res = cli("omni_jax.cli.evaluate", "--workdir", str(tmp_path / "nope"), "--data", str(ev))
    assert res.returncode == 2
    assert f"error: --workdir '{tmp_path / 'nope'}': no such directory" in res.stderr
    config = load_run_config(workdir)
    with pytest.raises(ValueError, match="--data '.*missing.jsonl': no such file or directory"):
        runner.evaluate_stage(config, workdir, None, [str(tmp_path / "missing.jsonl")])
    with pytest.raises(ValueError, match="no finished stage in .*: none of \\['speech_gen'\\]"):
        runner.evaluate_stage(config, str(tmp_path), None, [str(ev)])
    with pytest.raises(ValueError, match="unknown stage 'phase9'"):
        runner.evaluate_stage(config, workdir, "phase9", [str(ev)])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="a directory without \\*.jsonl manifests"):
        T.manifest_paths([str(empty)])


def test_default_data(trained, tmp_path):
    _, workdir, ev, _ = trained
    config = load_run_config(workdir)
    config.data_root = str(tmp_path / "train")
    with pytest.raises(ValueError, match="no evaluation data: config.eval.data is unset"):
        runner.default_data(config)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "image_qa.jsonl").write_text("")
    assert runner.default_data(config) == [str(tmp_path / "test")]  # the sibling split
    config.eval = {"data": str(ev)}
    assert runner.default_data(config) == [str(ev)]


def test_train_cli_hook_writes_the_stage_report(trained, tmp_path):
    """config.eval.after_each_stage's hook (recipes.run.evaluate_after): the stage's report
    lands in <workdir>/eval/<stage>.json, from config.eval's data and record limit."""
    from omni_jax.recipes.run import evaluate_after

    root, workdir, ev, good = trained
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval"))
    config = load_run_config(str(copy))
    config.eval.data, config.eval.max_records = str(ev / "image_qa.jsonl"), 2
    lines = []
    report = evaluate_after(config, str(copy), STAGE, lines.append)
    saved = json.loads((copy / "eval" / f"{STAGE}.json").read_text())
    assert saved["metrics"]["image_qa_accuracy"]["count"] == 2 == report["records"]["evaluated"]
    assert "image_qa_accuracy" in "\n".join(lines)


def test_answers_are_not_cut_shorter_than_their_reference(trained, monkeypatch, tmp_path):
    """The generation budget is max_new_tokens, or a reference's length + REFERENCE_SLACK
    where that is longer (a worked answer, e.g. omni_digits' running sums)."""
    import omni_jax.infer.omni as infer

    _, workdir, ev, data = trained
    config = load_run_config(workdir)
    budgets = []

    def generate(module, variables, batch, *, max_new_tokens, eos_id, **kw):
        budgets.append(max_new_tokens)  # every row stops at once (empty answers)
        return np.full((batch["input_ids"].shape[0], max_new_tokens), eos_id[0], np.int32)

    monkeypatch.setattr(infer, "generate_omni", generate)
    long = "seven plus eight is fifteen, " * 10  # 50 words: at least 50 tokens
    short, worked = ({**r, "task": "image_qa"} for r in data["qa"][:2])
    worked["messages"] = [worked["messages"][0], {"role": "assistant", "content": long}]
    for recs, want in (([short], lambda n: n == 16), ([short, worked], lambda n: n >= 54)):
        budgets.clear()
        path = _write(tmp_path / "qa.jsonl", recs)
        report = runner.evaluate_stage(config, workdir, None, [path], max_new_tokens=16)
        assert report["metrics"]["image_qa_accuracy"]["count"] == len(recs), report["skipped"]
        assert len(budgets) == 1 and want(budgets[0]), budgets
