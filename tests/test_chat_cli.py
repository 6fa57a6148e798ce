"""The chat CLI end to end: a tiny Capybara recipe trained for 2 steps (train CLI), then a chat
turn with an image and an audio clip: in process (streamed, spoken) it equals generate_omni on
the stage's final params; the command line prints the same answer; bad input exits 2."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from omni_jax.cli.chat import run_chat
from omni_jax.infer.generate import SamplingConfig
from omni_jax.infer.omni import generate_omni, prompt_from_record, user_record
from omni_jax.infer.stream import SentenceSplitter, espeak_available
from omni_jax.omni_config import OmniConfig
from omni_jax.recipes import final_params, load_recipe, make_plan
from omni_jax.train.omni_model import OmniLM

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Describe the image."
SAMPLING = dict(temperature=1.0, top_k=50)  # an untrained model's greedy answer is one token
NEW, SEED = 24, 1


def overrides(fx: str, spm: str) -> list[str]:
    return [f"--config.data_root={fx}", f"--config.tokenizer.path={spm}",
            "--config.stages.phase1a.steps=2", "--config.train.peak_flops=1e9",
            "--config.train.progress_bar=False", "--config.train.tensorboard=False"]


def in_process_config(fx: str, spm: str, recipe: str = "capybara:model=tiny"):
    c = load_recipe(recipe)
    c.data_root, c.tokenizer.path = fx, spm
    if "phase1a" in c.stages:
        c.stages.phase1a.steps = 2
    return c


def cli(module: str, *args: str, fast: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if fast:  # cheap XLA:CPU compiles for the training run
        env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 " \
                           "--xla_llvm_disable_expensive_passes=true"
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Fixture data + SentencePiece tokenizer; Capybara phase1a trained for 2 steps."""
    from omni_jax.data.fixtures import make_fixtures, train_fixture_tokenizer

    root = tmp_path_factory.mktemp("chat")
    manifests = make_fixtures(root / "fx", num_images=4, num_audio=2, num_videos=1, num_text=4,
                              use_espeak=False)
    spm = train_fixture_tokenizer(manifests, 400, root / "spm", repeat=8)
    fx, workdir = str(root / "fx"), str(root / "run")
    res = cli("omni_jax.cli.train", "--config", "capybara:model=tiny", "--workdir", workdir,
              "--stage", "phase1a", *overrides(fx, spm), fast=True)
    assert res.returncode == 0 and "stages: phase1a=trained" in res.stdout, res.stderr[-3000:]
    media = {"images": [os.path.join(fx, "images", sorted(os.listdir(root / "fx/images"))[0])],
             "audios": [os.path.join(fx, "audio", "clip_00.wav")]}
    return root, fx, spm, workdir, media


@pytest.fixture(scope="module")
def chat_answer(trained):
    """run_chat streamed and spoken, and the reference: generate_omni on the final params."""
    root, fx, spm, workdir, media = trained
    config = in_process_config(fx, spm)
    lines = []
    answer = run_chat(config, workdir, PROMPT, sampling=SamplingConfig(greedy=False, **SAMPLING),
                      seed=SEED, max_new_tokens=NEW, stream=True,
                      speak_dir=str(root / "speech"), echo=lines.append, **media)
    from omni_jax.data.omni import OmniEncoder
    from omni_jax.data.template import ChatTemplate
    from omni_jax.data.tokenizer import load_tokenizer

    omni = OmniConfig.from_dict(config.model.to_dict())
    lm = OmniLM(omni)
    tok = load_tokenizer(config.tokenizer.to_dict())
    from omni_jax.data.features.config import AudioConfig

    encoder = OmniEncoder(omni, ChatTemplate(tok),
                          audio=AudioConfig.from_dict(config.audio_features.to_dict()))
    batch = prompt_from_record(encoder, user_record(PROMPT, **media))
    assert batch["image"].shape == (1, 32, 32, 3) and batch["audio"].shape == (1, 80, 100)
    params = final_params(workdir, make_plan(config, lm)[0], lm)
    ids = np.asarray(generate_omni(
        lm.module, {"params": params}, batch, max_new_tokens=NEW, eos_id=tok.eos_id,
        pad_id=tok.pad_id, sampling=SamplingConfig(greedy=False, **SAMPLING),
        rng=jax.random.key(SEED), vocab_limit=tok.vocab_size))[0]
    ids = ids[:np.argmax(ids == tok.eos_id)] if (ids == tok.eos_id).any() else ids
    return answer, lines, tok.decode(ids.tolist()).strip(), root


def test_streamed_chat_equals_generate_omni(chat_answer):
    answer, lines, reference, root = chat_answer
    assert answer == reference and len(reference) > 10
    splitter = SentenceSplitter()
    assert lines == splitter.feed(reference) + splitter.flush()  # one echo per sentence
    if espeak_available():
        wavs = sorted(os.listdir(root / "speech"))
        assert wavs == [f"sentence_{i:03d}.wav" for i in range(len(lines))]


def test_command_line_prints_the_answer(trained, chat_answer, tmp_path):
    """Only --workdir: the config (tokenizer, data, overrides) is the one the run wrote."""
    _, fx, spm, workdir, media = trained
    res = cli("omni_jax.cli.chat", "--workdir", str(tmp_path), "--prompt", PROMPT)
    assert res.returncode == 2 and "is not an omni_jax run directory: no omni_jax_run.json" \
        in res.stderr, res.stderr[-2000:]
    res = cli("omni_jax.cli.chat", "--workdir", workdir, "--prompt", PROMPT,
              "--image", media["images"][0],
              "--audio", media["audios"][0], f"--max_new_tokens={NEW}", f"--seed={SEED}",
              f"--temperature={SAMPLING['temperature']}", f"--top_k={SAMPLING['top_k']}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == chat_answer[0]


def test_bad_input_exits_2(trained, tmp_path):
    _, fx, spm, workdir, media = trained
    config = in_process_config(fx, spm)
    with pytest.raises(ValueError, match="no finished stage in .*: none of \\['phase1a', "
                                         "'phase1b'.* has its final checkpoint"):
        run_chat(config, str(tmp_path), PROMPT)
    with pytest.raises(ValueError, match="stage 'phase2' has not finished in .*; finished: "
                                         "\\['phase1a'\\]"):
        run_chat(config, workdir, PROMPT, stage="phase2")
    ovis = in_process_config(fx, spm, "ovis:model=tiny")
    with pytest.raises(ValueError, match="--audio given but the model of recipe 'ovis' \\(tiny\\) "
                                         "has no audio tower; it takes: image"):
        run_chat(ovis, workdir, PROMPT, audios=media["audios"])
    fake = tmp_path / "fake.png"
    fake.write_text("not a picture")
    with pytest.raises(ValueError, match=f"cannot read --image '{fake}' as image: "):
        run_chat(config, workdir, PROMPT, images=[str(fake)])
    res = cli("omni_jax.cli.chat", "--config", "capybara:model=tiny", "--workdir", workdir,
              *overrides(fx, spm), "--prompt", PROMPT, "--audio", str(tmp_path / "none.wav"))
    assert res.returncode == 2
    assert f"error: cannot read --audio '{tmp_path / 'none.wav'}': no such readable file" \
        in res.stderr


# ---- speech out with the trained generator (OpenOmni stage IV) ----------------------------------
def speech_overrides(fx: str, spm: str) -> list[str]:
    return [f"--config.data_root={fx}", f"--config.tokenizer.path={spm}",
            "--config.stage_order=('speech_gen',)", "--config.stages.speech_gen.steps=2",
            "--config.train.peak_flops=1e9", "--config.train.progress_bar=False",
            "--config.train.tensorboard=False"]


def speech_config(fx: str, spm: str):
    c = load_recipe("openomni:model=tiny")
    c.data_root, c.tokenizer.path, c.stage_order = fx, spm, ("speech_gen",)
    c.stages.speech_gen.steps = 2
    return c


@pytest.fixture(scope="module")
def speech_trained(tmp_path_factory):
    """OpenOmni tiny: only stage IV (CTC generator) trained for 2 steps on speech fixtures."""
    from omni_jax.data.fixtures import make_fixtures, train_fixture_tokenizer
    from omni_jax.data.speech_fixtures import make_speech_fixtures

    root = tmp_path_factory.mktemp("chat_speech")
    manifests = make_fixtures(root / "fx", num_images=4, num_audio=2, num_videos=1, num_text=4,
                              use_espeak=False)
    units_dir = make_speech_fixtures(root / "fx", manifests)["units_dir"]
    spm = train_fixture_tokenizer(manifests, 400, root / "spm", repeat=8)
    fx, workdir = str(root / "fx"), str(root / "run")
    res = cli("omni_jax.cli.train", "--config", "openomni:model=tiny", "--workdir", workdir,
              *speech_overrides(fx, spm), fast=True)
    assert res.returncode == 0 and "stages: speech_gen=trained" in res.stdout, res.stderr[-3000:]
    return root, fx, spm, workdir, units_dir


def test_chat_speaks_with_the_trained_generator(speech_trained):
    import json

    import soundfile as sf

    from omni_jax.data.template import ChatTemplate
    from omni_jax.data.tokenizer import load_tokenizer
    from omni_jax.infer.speech import SpeechOut, speak_sentences
    from omni_jax.speech.vocoder import MelTableVocoder

    root, fx, spm, workdir, units_dir = speech_trained
    config, out, lines = speech_config(fx, spm), root / "speech", []
    sampling = SamplingConfig(greedy=False, **SAMPLING)
    answer = run_chat(config, workdir, PROMPT, sampling=sampling, seed=SEED,
                      max_new_tokens=NEW, stream=True, speak_dir=str(out), units_dir=units_dir,
                      echo=lines.append)
    meta = json.loads((out / "speech.json").read_text())
    vocoder = MelTableVocoder.load(units_dir)
    wav, rate = sf.read(out / "answer.wav", dtype="float32")
    units = [np.asarray(s["units"], np.int32) for s in meta["sentences"]]
    n_units = sum(len(u) for u in units)
    print(f"chat speech: {len(units)} sentence(s), {n_units} units, {len(wav)} samples")
    assert rate == meta["sample_rate"] == vocoder.sample_rate == 16000  # espeak-ng: 22050
    assert [s["text"] for s in meta["sentences"]] == lines and answer
    assert n_units > 0 and len(wav) == n_units * vocoder.sample_rate // vocoder.frame_rate
    for k, u in enumerate(units):  # each sentence wav is the vocoder on its units
        got, _ = sf.read(out / f"sentence_{k:03d}.wav", dtype="float32")
        np.testing.assert_array_equal(got, vocoder(u) if len(u) else np.zeros(0, np.float32))
    # the units are the trained generator's on the LLM's states (non-streamed run, same tokens)
    from omni_jax.data.omni import OmniEncoder

    omni = OmniConfig.from_dict(config.model.to_dict())
    lm = OmniLM(omni)
    tok = load_tokenizer(config.tokenizer.to_dict())
    from omni_jax.data.features.config import AudioConfig

    encoder = OmniEncoder(omni, ChatTemplate(tok),
                          audio=AudioConfig.from_dict(config.audio_features.to_dict()))
    batch = prompt_from_record(encoder, user_record(PROMPT))
    params = final_params(workdir, make_plan(config, lm)[0], lm)
    llm = {"params": {k: v for k, v in params.items() if k != "speech"}}
    spans = [s["token_ids"] for s in meta["sentences"]]  # (= generate_omni's: infer tests)
    assert tok.decode([t for s in spans for t in s]).strip() == answer
    speech = SpeechOut.from_template(omni.speech, params["speech"], vocoder, encoder.template)
    assert speech.header_len == 3 and speech.footer_ids[0] == tok.im_end_id
    ref = speak_sentences(lm.module, llm, batch, speech, spans)
    for u, r in zip(units, ref):
        np.testing.assert_array_equal(u, r.units)


def test_chat_generator_without_vocoder_fails_clearly(speech_trained, trained, tmp_path):
    root, fx, spm, workdir, _ = speech_trained
    with pytest.raises(ValueError, match="has a trained speech generator but no vocoder"):
        run_chat(speech_config(fx, spm), workdir, PROMPT, speak_dir=str(tmp_path / "s"))
    res = cli("omni_jax.cli.chat", "--config", "openomni:model=tiny", "--workdir", workdir,
              *speech_overrides(fx, spm), "--prompt", PROMPT, "--speak_dir",
              str(tmp_path / "s"), "--units_dir", str(tmp_path / "none"))
    assert res.returncode == 2
    assert f"error: --units_dir '{tmp_path / 'none'}': no such directory" in res.stderr
    _, cfx, cspm, cworkdir, _ = trained  # capybara: no generator at all
    with pytest.raises(ValueError, match="--tts=generator but stage 'phase1a' has no trained"):
        run_chat(in_process_config(cfx, cspm), cworkdir, PROMPT, speak_dir=str(tmp_path),
                 tts="generator")
