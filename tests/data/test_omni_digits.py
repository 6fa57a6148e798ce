"""omni_digits: offline TFDS build (no TensorFlow), disjoint splits, tasks, manifests, speech."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tensorflow_datasets")
if not __import__("shutil").which("espeak-ng"):
    pytest.skip("espeak-ng is not installed", allow_module_level=True)

from omni_jax.configs.common import SOURCES  # noqa: E402  (the recipes' source names)
from omni_jax.data.fixtures import DIGIT_WORDS  # noqa: E402
from omni_jax.data.omni_digits import builder as B  # noqa: E402
from omni_jax.data.omni_digits import export as E  # noqa: E402
from omni_jax.data.omni_digits import tasks as T  # noqa: E402
from omni_jax.data.omni_digits import voices as V  # noqa: E402


def _s(v):
    return v.decode() if isinstance(v, bytes) else str(v)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("omni_digits")
    data_dir, out = str(tmp / "tfds"), str(tmp / "export")
    summary = E.main(["--out", out, "--config", "small", "--data_dir", data_dir])
    builder = B.make_builder("small", data_dir)
    records = {s: [builder.as_data_source(split=s)[i]
                   for i in range(len(builder.as_data_source(split=s)))] for s in V.SPLITS}
    return {"builder": builder, "data_dir": data_dir, "out": out, "summary": summary,
            "records": records}


def test_builds_offline_and_reads_back_without_tensorflow(built):
    assert "tensorflow" not in sys.modules
    assert built["summary"]["build_seconds"] is not None  # the CLI built it
    want = {s: built["builder"].info.splits[s].num_examples for s in V.SPLITS}
    assert want == {s: 4 * len(T.TASKS) for s in V.SPLITS}
    code = textwrap.dedent(f"""
        import importlib.abc, importlib.machinery, json, sys

        class Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            # any `import tensorflow...` fails, even where TensorFlow is installed
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "tensorflow":
                    return importlib.machinery.ModuleSpec(name, self)
                return None

            def create_module(self, spec):
                raise ImportError(f"{{spec.name}} is blocked in this test")

        sys.meta_path.insert(0, Block())
        try:
            import tensorflow  # noqa: F401
            sys.exit("the tensorflow block does not work")
        except ImportError:
            pass
        import tensorflow_datasets as tfds
        from omni_jax.data.omni_digits import builder  # registers omni_digits
        out = {{}}
        for s in ("train", "validation", "test"):
            src = tfds.data_source("omni_digits/small", data_dir={built['data_dir']!r}, split=s)
            out[s] = [len(src), src[0]["audio"].dtype.name, src[0]["image"].dtype.name]
        assert not [m for m in sys.modules if m.split(".")[0] == "tensorflow"]
        print(json.dumps(out))
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {s: [want[s], "int16", "uint8"] for s in V.SPLITS}


def test_image_instances_in_exactly_one_split_stratified(built):
    _, labels = T.load_images()
    splits = T.split_images(labels)
    allidx = np.concatenate(list(splits.values()))
    assert sorted(allidx.tolist()) == list(range(len(labels)))  # each image exactly once
    for s, frac in T.FRACTIONS.items():
        per_class = np.bincount(labels[splits[s]], minlength=10)
        np.testing.assert_allclose(per_class / np.bincount(labels), frac, atol=0.02)
        assert set(labels[splits[s][:10]].tolist()) == set(range(10))  # round-robin prefix
    used = {s: {int(i) for r in recs for i in [*r["image_index"], *r["target_index"]]}
            for s, recs in built["records"].items()}  # inputs and image-out targets
    for s in V.SPLITS:
        assert used[s] and used[s] <= set(splits[s].tolist())
    assert not used["train"] & used["test"] and not used["train"] & used["validation"]
    assert not used["validation"] & used["test"]


def test_voices_disjoint_across_splits(built):
    lists = [set(V.voices(s)) for s in V.SPLITS]
    assert [len(v) for v in lists] == [32, 2, 3]
    variants = [{v.split("+")[1] for v in vs} for vs in lists]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not lists[a] & lists[b] and not variants[a] & variants[b]
    assert all(V.ASSISTANT_VOICE not in vs for vs in lists)
    used = {s: {_s(r["voice"]) for r in recs if r["audio"].size}
            for s, recs in built["records"].items()}
    for s in V.SPLITS:
        assert used[s] and used[s] <= set(V.voices(s))
    assert not used["test"] & (used["train"] | used["validation"])
    # each voice really sounds different (espeak ignores variants of some accents, e.g. en-gb)
    renders = {v: V.render("three one four", v).tobytes() for vs in lists for v in vs}
    assert len(set(renders.values())) == len(renders)


def test_train_user_speech_varies_its_prosody():
    rng = np.random.default_rng(0)
    styles = [V.user_style("train", rng) for _ in range(64)]
    (p0, p1), (s0, s1) = V.TRAIN_PROSODY["pitch"], V.TRAIN_PROSODY["speed"]
    assert all(p0 <= s.pitch <= p1 and s0 <= s.speed <= s1 for s in styles)
    assert len({s.pitch for s in styles}) > 20 and len({s.speed for s in styles}) > 20
    assert V.user_style("test", rng) == V.USER == V.user_style("validation", rng)
    with pytest.raises(ValueError, match="unknown split"):
        V.user_style("dev", rng)
    # a different prosody is a different sound
    assert V.render("two", "en-us+m1", styles[0]).tobytes() != V.render("two", "en-us+m1").tobytes()


def test_speech_rendered_ahead_in_parallel_is_the_same(built, monkeypatch):
    """prefetch_speech: speech_wanted lists exactly the renderings generate asks for (in order),
    render_many puts them in render's cache, and the records built from it are the built ones."""
    plan = B.make_builder("small", built["data_dir"]).builder_config.plans()["test"]
    wanted = T.speech_wanted(plan, "speech_asr")
    recs = [ex for _, ex in T.generate(plan, "speech_asr")]
    assert [w[:2] for w in wanted] == [(r["answer"], r["voice"]) for r in recs]
    assert all(isinstance(w[2], V.Style) for w in wanted)
    V._render.cache_clear()
    assert T.prefetch_speech(plan, "speech_asr", workers=2) == len(set(wanted))
    info = V._render.cache_info()
    got = [ex for _, ex in T.generate(plan, "speech_asr")]
    assert V._render.cache_info().misses == info.misses  # every rendering was found cached
    built_recs = {_s(r["id"]): r for r in built["records"]["test"]}
    for r in got:
        np.testing.assert_array_equal(r["audio"], built_recs[r["id"]]["audio"])
    V._render.cache_clear()
    one = V.render(*wanted[0])
    V._render.cache_clear()
    V.render_many(wanted[:3], workers=2)
    np.testing.assert_array_equal(V.render(*wanted[0]), one)
    assert T.prefetch_speech(plan, "image_qa") == 0
    with pytest.raises(ValueError, match="workers must be >= 1"):
        V.render_many(wanted[:2], workers=0)
    with pytest.raises(ValueError, match="exceed the cache"):
        V.render_many((str(i), "en-us", V.NEUTRAL) for i in range(V.RENDER_CACHE + 1))
    monkeypatch.setattr(V, "RENDER_CACHE", 2)  # a task larger than the cache: its first ones
    assert T.prefetch_speech(plan, "speech_asr", workers=2) == 2


def _check_record(r, labels, vocab):
    task, a = _s(r["task"]), _s(r["answer"])
    assert _s(r["id"]).split("-")[1] == task and bool(a) == (task not in T.IMAGE_OUT)
    assert (r["target_image"].shape[0] == 1) == (task in T.IMAGE_OUT)
    parts = T.TASKS[task]
    assert (r["image"].shape[0] == 1) == ("image" in parts)
    assert (r["audio"].size > 0) == ("audio" in parts)
    assert (3 <= r["video"].shape[0] <= 5) if "video" in parts else r["video"].shape[0] == 0
    ds = r["digits"].tolist()
    if r["image_index"].size:
        np.testing.assert_array_equal(labels[r["image_index"]], ds[:len(r["image_index"])])
    if task == "image_caption":
        assert DIGIT_WORDS[ds[0]] in a and a.endswith(".")
    elif task in ("image_qa", "spoken_image_qa"):
        assert a in (DIGIT_WORDS[ds[0]], "yes", "no")
        if _s(r["prompt"]) == "Is this digit even?":
            assert a == ("yes" if ds[0] % 2 == 0 else "no")
    elif task == "speech_asr":
        assert a == " ".join(DIGIT_WORDS[d] for d in ds) and 3 <= len(ds) <= 5
    elif task in ("video_qa", "video_spoken_qa"):
        q = _s(r["prompt"])
        want = {T.VIDEO_QUESTIONS["count"]: T.number_words(len(ds)),
                T.VIDEO_QUESTIONS["sum"]: T.number_words(sum(ds)),
                T.VIDEO_QUESTIONS["order"]: " ".join(DIGIT_WORDS[d] for d in ds)}
        assert a == want.get(q, a)
    elif task in T.IMAGE_OUT:
        pixels, _ = T.load_images()
        t = int(r["target_index"][0])
        np.testing.assert_array_equal(r["target_image"][0], pixels[t])
        if task == "text_to_image":
            assert DIGIT_WORDS[ds[0]] in _s(r["prompt"]) and labels[t] == ds[0]
        elif task == "image_to_image":
            np.testing.assert_array_equal(r["image"][0], r["target_image"][0])
        else:  # three consecutive digits, then the next one
            assert r["video"].shape[0] == 3 and ds[3] == labels[t]
            assert [(ds[0] + k) % 10 for k in range(4)] == ds
    elif task == "text_chat":
        x, y = ds
        assert (f"is {T.number_words(x + y)}." in a) or (f"is {T.number_words(x - y)}." in a)
    if task in ("speech_response", "speech_dpo"):  # the short answer (image_qa's) or a sentence
        assert a in (DIGIT_WORDS[ds[0]], "yes", "no") or (a.endswith(".") and " " in a)
    if task in ("speech_response", "speech_dpo"):
        assert r["speech"].size > 0 and r["speech_units"].size > 0
        assert 0 <= r["speech_units"].min() and r["speech_units"].max() < vocab
        assert (r["speech_units_rejected"].size > 0) == (task == "speech_dpo")
    else:
        assert r["speech"].size == 0 and r["speech_units"].size == 0


def test_every_task_present_and_well_formed(built):
    _, labels = T.load_images()
    plans = built["builder"].builder_config.plans()
    for s, recs in built["records"].items():
        tasks = sorted(_s(r["task"]) for r in recs)
        assert tasks == sorted(t for t in T.TASKS for _ in range(plans[s].counts[t]))
        for r in recs:
            _check_record(r, labels, vocab=32)
    a = [ex for _, ex in T.generate(plans["train"], "video_qa")]  # deterministic
    b = [ex for _, ex in T.generate(plans["train"], "video_qa")]
    assert [x["answer"] for x in a] == [x["answer"] for x in b]
    np.testing.assert_array_equal(a[0]["video"], b[0]["video"])


@pytest.mark.parametrize("task", ["speech_response", "speech_dpo"])
def test_speech_answers_say_short_answers_and_sentences(task):
    """speech_response (and since 1.4.0 speech_dpo, in both styles) speaks the answer it
    records: about SHORT_SPOKEN of them the short answer image_qa teaches (what the trained
    LLM says), the rest the sentence of the same question; the question and image draws are
    those of the sentence-only 1.2.0."""
    plan = T.make_plans(max_images={"train": 400})["train"]
    said: list[str] = []

    def speech_fn(text, style):
        said.append(text)
        return np.ones(160, np.int16), np.zeros(4, np.int32)

    recs = [ex for _, ex in T.generate(plan, task, speech_fn)]
    answers = [_s(r["answer"]) for r in recs]
    per = 2 if task == "speech_dpo" else 1  # the chosen and the rejected rendering
    assert said == [a for a in answers for _ in range(per)]
    assert len(recs) == plan.counts[task] >= 200
    short = [a in (*DIGIT_WORDS, "yes", "no") for a in answers]
    assert abs(np.mean(short) - T.SHORT_SPOKEN) < 0.1, np.mean(short)
    # the draws of 1.2.0: replaying the question stream gives the same (question, answers)
    rng = np.random.default_rng([plan.seed, V.SPLITS.index("train"), list(T.TASKS).index(task)])
    for r, a in zip(recs, answers):
        q, short_a, sentence = T._image_question(rng, int(r["digits"][0]))
        assert _s(r["prompt"]) == q and a in (short_a, sentence)
        if task == "speech_dpo":  # the style draw follows the question's (as in 1.2.0)
            assert _s(r["style"]) == V.EXPRESSIVE[int(rng.integers(len(V.EXPRESSIVE)))].name


def test_manifests_load_with_project_reader_and_decode(built):
    from omni_jax.data.features import audio as afeat
    from omni_jax.data.features import image as ifeat
    from omni_jax.data.features import video as vfeat
    from omni_jax.data.features.config import AudioConfig
    from omni_jax.data.sources import JsonlSource, read_media
    from omni_jax.speech.units import UnitTokenizer, check_units

    for s in V.SPLITS:
        out = os.path.join(built["out"], s)
        tok = UnitTokenizer.load(os.path.join(out, "units"))
        assert built["summary"]["splits"][s] == dict.fromkeys(T.TASKS, 4)
        for name in SOURCES:
            src = JsonlSource(os.path.join(out, f"{name}.jsonl"), on_corrupt="raise")
            assert len(src) == 4 and src.num_corrupt == 0
            for rec in (src[i] for i in range(len(src))):
                kinds = [p["type"] for p in rec["messages"][0]["content"]]
                assert tuple(kinds) == T.TASKS[name] and rec["task"] == name
                for m in E.SOURCE_MODALITIES[name]:
                    ref = rec[m + "s"][0]
                    assert os.path.isabs(ref[0] if m == "video" else ref)  # resolved
                for ref in rec.get("images", []):
                    img = ifeat.to_rgb(ifeat.decode_image(read_media(ref)))
                    assert img.shape == (64, 64, 3) and img.min() < 100 < img.max()
                for frames in rec.get("videos", []):
                    arr = np.stack([ifeat.to_rgb(ifeat.decode_image(read_media(f)))
                                    for f in frames])
                    assert vfeat.sample_frames(arr, 4).shape == (4, 64, 64, 3)
                for ref in rec.get("audios", []):
                    w = afeat.decode_audio(read_media(ref), AudioConfig())
                    assert afeat.log_mel(w, AudioConfig()).shape == (80, 3000)
                for key in ("speech_units", "speech_units_rejected"):
                    if key in rec:
                        check_units(rec[key], tok.vocab_size, key)
        for name in T.IMAGE_OUT:  # X-VILA's image-out records (omni_jax.data.gen_image)
            src = JsonlSource(os.path.join(out, f"{name}.jsonl"), on_corrupt="raise")
            assert len(src) == 4
            for rec in (src[i] for i in range(len(src))):
                assert rec["messages"][1]["content"] == [{"type": "gen_image"}]
                img = ifeat.to_rgb(ifeat.decode_image(read_media(rec["gen_image"])))
                assert os.path.isabs(rec["gen_image"]) and img.shape == (64, 64, 3)
                assert rec["gen_image"].endswith(f"digit_{rec['target_index']:04d}.png")


def test_spoken_audio_nonsilent_with_plausible_duration(built):
    for recs in built["records"].values():
        for r in recs:
            for key in ("audio", "speech", "speech_rejected"):
                w = r[key].astype(np.float32) / 32768.0
                if not w.size:
                    continue
                words = len(_s(r["prompt"] if key == "audio" else r["answer"]).split())
                if _s(r["task"]) == "speech_asr":
                    words = len(_s(r["answer"]).split())
                dur = w.size / V.SAMPLE_RATE
                assert 0.1 * words < dur < 0.2 + 0.6 * words, (r["id"], key, dur, words)
                assert np.sqrt(np.mean(w ** 2)) > 0.02 and np.abs(w).max() > 0.1


def test_units_are_the_train_fitted_tokenizers_encoding(built):
    from omni_jax.speech.units import UnitTokenizer

    tok = UnitTokenizer.load(B.units_dir(built["builder"]))
    assert tok.vocab_size == 32 and tok.config.frame_rate == 25
    r = next(r for r in built["records"]["test"] if _s(r["task"]) == "speech_dpo")
    for w, u in ((r["speech"], r["speech_units"]), (r["speech_rejected"],
                                                    r["speech_units_rejected"])):
        np.testing.assert_array_equal(tok.encode(w.astype(np.float32) / 32768.0, 16000), u)


def test_dpo_chosen_is_higher_pitched_than_rejected(built):
    import librosa

    def mean_f0(w):
        f0, voiced, _ = librosa.pyin(w.astype(np.float32) / 32768.0, fmin=60, fmax=500,
                                     sr=V.SAMPLE_RATE, frame_length=1024)
        return float(np.nanmean(f0[voiced]))

    recs = [r for r in built["records"]["train"] if _s(r["task"]) == "speech_dpo"][:3]
    for r in recs:
        assert _s(r["style"]) in {s.name for s in V.EXPRESSIVE}
        assert _s(r["style_rejected"]) == "neutral"
        chosen, rejected = mean_f0(r["speech"]), mean_f0(r["speech_rejected"])
        assert chosen > 1.15 * rejected, (r["id"], chosen, rejected)
        assert r["speech"].size < r["speech_rejected"].size  # expressive is faster


def test_bad_input_raises_value_error(built, tmp_path):
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="unknown config 'medium'"):
        B.make_builder("medium", str(tmp_path))
    with pytest.raises(ValueError, match="not a directory"):
        B.prepare("small", str(a_file))
    with pytest.raises(ValueError, match="out_dir .* not a directory"):
        E.write_manifests(built["builder"], a_file, "train")
    with pytest.raises(ValueError, match="out_dir .* not a directory"):
        E.main(["--out", str(a_file), "--config", "small", "--data_dir", built["data_dir"]])
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        E.write_manifests(built["builder"], tmp_path / "o", "dev")
    with pytest.raises(ValueError, match="not a prepared omni_digits"):
        E.write_manifests(str(tmp_path), tmp_path / "o", "train")
    with pytest.raises(ValueError, match="unknown style"):
        V.render("one", "en-us", "angry")
    with pytest.raises(ValueError, match="unknown task"):
        next(T.generate(built["builder"].builder_config.plans()["train"], "ocr"))
