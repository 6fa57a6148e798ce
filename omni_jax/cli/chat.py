"""Chat with a trained recipe: `python -m omni_jax.cli.chat --workdir DIR [--config RECIPE[:ARG]]
--prompt "..." [--image PATH] [--audio PATH] [--video PATH|FRAME_DIR] [--stage NAME]
[--max_new_tokens N] [--stream] [--speak_dir DIR] [--units_dir DIR] [--tts auto]
[--out image.png [--image_steps N] [--guidance S]]`.

Loads the final parameters of a stage trained by omni_jax.cli.train in DIR (default: the last
finished stage of config.stage_order) and the recipe's tokenizer. The config is the one the
training run wrote into DIR (no overrides to repeat); --config (with --config.* overrides)
replaces it. Parameters only are restored (no optimizer state), in their shardings.
The answer is printed whole, or with --stream sentence by sentence as it decodes
(Ola-style); --speak_dir speaks each sentence to a wav there (espeak-ng; infer.stream's
pluggable `speak` hook). Media flags repeat for several items. Bad input (no finished stage,
media for a modality the model lacks, unreadable media, a prompt too long for the model)
prints the error and exits with status 2. --config/--workdir/--stage are the flags of
omni_jax.cli.recipes, shared with the train CLI.
Speech out: when the model has a speech generator (config.model.speech) that a finished stage
up to the chosen one trained, --speak_dir speaks with it (infer.speech: the LLM's states per
sentence -> units -> the vocoder of --units_dir, default config.speech_units.dir) and writes
sentence_NNN.wav, answer.wav (all sentences) and speech.json (sentences, units) there; else
espeak-ng. --tts=generator|espeak forces one (auto by default).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import flags

from omni_jax import recipes as omni_recipes  # the library API (plans, final params)
from omni_jax.cli import recipes
from omni_jax.infer.generate import SamplingConfig
from omni_jax.infer.omni import (
    GREEDY,
    generate_omni,
    prompt_from_record,
    stream_omni,
    user_record,
)
from omni_jax.omni_config import MODALITIES, OmniConfig

RECORD_KEYS = {"image": "images", "video": "videos", "audio": "audios"}
SPEECH_PARAMS = ("speech", "speech_ref")  # generator params: not the LLM's
TTS = ("auto", "generator", "espeak")
_FRAME_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _media_refs(modality: str, path: str) -> Any:
    """A --image/--audio/--video path -> a record ref (a frame directory -> its frame list)."""
    if modality == "video" and os.path.isdir(path):
        frames = sorted(os.path.join(path, f) for f in os.listdir(path)
                        if f.lower().endswith(_FRAME_EXTS))
        if not frames:
            raise ValueError(f"cannot read --video {path!r}: a directory without image frames "
                             f"({', '.join(_FRAME_EXTS)})")
        return frames
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ValueError(f"cannot read --{modality} {path!r}: no such readable file")
    return path


def _load_media(encoder: Any, media: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Decode every item (one at a time, so an error names its file) -> batch media arrays."""
    parts: dict[str, list[np.ndarray]] = {}
    for m, paths in media.items():
        for path in paths:
            ref = _media_refs(m, path)
            try:
                arrays = encoder.media({RECORD_KEYS[m]: [ref]})
            except Exception as e:  # noqa: BLE001 - any decoder failure is unreadable input
                raise ValueError(f"cannot read --{m} {path!r} as {m}: {e}") from e
            for key, value in arrays.items():
                parts.setdefault(key, []).append(value)
    return {k: np.concatenate(v) for k, v in parts.items()}


def pick_stage(config: ml_collections.ConfigDict, workdir: str, model: Any,
               stage: str | None = None) -> omni_recipes.StagePlan:
    """The plan of `stage` (it must have finished) or of the last finished stage."""
    return _pick(config, workdir, model, stage)[0]


def _pick(config: ml_collections.ConfigDict, workdir: str, model: Any, stage: str | None
          ) -> tuple[omni_recipes.StagePlan, bool]:
    """(plan, whether it or a finished stage before it trained the speech generator)."""
    plan, finished = _pick_plan(config, workdir, model, stage)
    upto = finished[:[p.name for p in finished].index(plan.name) + 1]
    return plan, any("speech" in p.trainable_groups for p in upto)


def _pick_plan(config: ml_collections.ConfigDict, workdir: str, model: Any,
               stage: str | None) -> tuple[omni_recipes.StagePlan, list[omni_recipes.StagePlan]]:
    plans = omni_recipes.make_plan(config, model)
    names = [p.name for p in plans]
    if stage is not None and stage not in names:
        raise ValueError(f"unknown stage {stage!r}; recipe {config.recipe!r} has stages {names}")
    finished = [p for p in plans if omni_recipes.stage_finished(workdir, p)]
    if stage is not None:
        if stage not in [p.name for p in finished]:
            raise ValueError(f"stage {stage!r} has not finished in {workdir} (no final "
                             f"checkpoint); finished: {[p.name for p in finished] or 'none'}")
        return plans[names.index(stage)], finished
    if not finished:
        raise ValueError(f"no finished stage in {workdir}: none of {names} has its final "
                         "checkpoint; train first (python -m omni_jax.cli.train with the same "
                         "--config) or check --workdir")
    return finished[-1], finished


def _vocoder(config: ml_collections.ConfigDict, units_dir: str | None) -> Any:
    """The vocoder of --units_dir (default config.speech_units.dir); clear error if none."""
    from omni_jax.speech.vocoder import MelTableVocoder

    path = units_dir or (config.get("speech_units", {}) or {}).get("dir") or ""
    if not path:
        raise ValueError("the model has a trained speech generator but no vocoder to voice its "
                         "units: give --units_dir (the saved unit tokenizer + vocoder "
                         "directory) or --config.speech_units.dir, or --tts=espeak")
    if not os.path.isdir(path):
        raise ValueError(f"--units_dir {path!r}: no such directory (expected vocoder.json + "
                         f"vocoder.npz, as MelTableVocoder.save writes)")
    try:
        return MelTableVocoder.load(path)
    except ValueError as e:
        raise ValueError(f"cannot load the vocoder of --units_dir: {e}") from e


def _write_speech(speak_dir: str, chunks: Sequence[Any]) -> str:
    """sentence_NNN.wav per chunk, answer.wav (all of them), speech.json -> a summary line."""
    import json

    import soundfile as sf

    os.makedirs(speak_dir, exist_ok=True)
    rate = chunks[0].sample_rate if chunks else 16000
    for c in chunks:
        sf.write(os.path.join(speak_dir, f"sentence_{c.index:03d}.wav"), c.wav, rate,
                 subtype="FLOAT")
    wav = np.concatenate([c.wav for c in chunks]) if chunks else np.zeros(0, np.float32)
    sf.write(os.path.join(speak_dir, "answer.wav"), wav, rate, subtype="FLOAT")
    meta = {"sample_rate": rate, "sentences": [
        {"text": c.sentence, "units": c.units.tolist(), "token_ids": list(c.token_ids),
         "samples": len(c.wav)} for c in chunks]}
    with open(os.path.join(speak_dir, "speech.json"), "w") as f:
        json.dump(meta, f)
    units = sum(len(c.units) for c in chunks)
    return (f"spoke {len(chunks)} sentence(s) with the speech generator ({units} units, "
            f"{len(wav) / rate:.2f} s) to {speak_dir}")


def run_chat(config: ml_collections.ConfigDict, workdir: str, prompt: str, *,
             stage: str | None = None, images: Sequence[str] = (), audios: Sequence[str] = (),
             videos: Sequence[str] = (), system: str | None = None, max_new_tokens: int = 256,
             sampling: SamplingConfig = GREEDY, seed: int = 0, stream: bool = False,
             speak_dir: str | None = None, voice: str | None = None,
             units_dir: str | None = None, tts: str = "auto", out: str | None = None,
             image_steps: int = 50, guidance: float = 3.0,
             echo: Callable[[str], None] = print) -> str:
    """Answer one user turn with a trained stage; -> the answer text (also echoed: whole, or
    one sentence per call with stream). Inputs are checked before the parameters load.
    tts: "auto" (the trained speech generator if any, else espeak-ng), "generator", "espeak".
    out: generate an image instead (X-VILA output head, config.xvila_output) and write it
    there as PNG; with --image the first image is reproduced / edited through the VEH."""
    import flax.linen as nn
    import jax

    from omni_jax.data.features.config import AudioConfig
    from omni_jax.data.omni import OmniEncoder
    from omni_jax.data.template import ChatTemplate
    from omni_jax.data.tokenizer import load_tokenizer
    from omni_jax.infer.stream import espeak_tts, stream_text
    from omni_jax.train.omni_model import OmniLM

    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("--prompt must be a non-empty string")
    if tts not in TTS:
        raise ValueError(f"--tts must be one of {TTS}, got {tts!r}")
    if out is not None and not config.get("xvila_output"):
        raise ValueError(f"--out {out!r}: the model of recipe {config.recipe!r} has no image "
                         f"decoder (an X-VILA output head: recipe xvila:output=on, "
                         f"config.xvila_output)")
    omni = OmniConfig.from_dict(config.model.to_dict())
    media = {"image": list(images), "video": list(videos), "audio": list(audios)}
    towers = [m for m in MODALITIES if getattr(omni, m) is not None and not config.text_only]
    for m, paths in media.items():
        if paths and m not in towers:
            raise ValueError(f"--{m} given but the model of recipe {config.recipe!r} "
                             f"({config.model_name}) has no {m} tower"
                             + (" (text_only recipe)" if config.text_only else "")
                             + f"; it takes: {', '.join(towers) or 'text only'}")
    if not config.tokenizer.path:
        raise ValueError("no tokenizer: set --config.tokenizer.path as for training")
    tok = load_tokenizer(config.tokenizer.to_dict())
    encoder = OmniEncoder(omni, ChatTemplate(tok),
                          audio=AudioConfig.from_dict(config.audio_features.to_dict()))
    arrays = _load_media(encoder, {m: p for m, p in media.items() if p})
    batch = prompt_from_record(encoder, user_record(prompt, system=system, **{
        RECORD_KEYS[m]: p for m, p in media.items()}), media=arrays)
    lm = OmniLM(omni, config.train.get("fused_head_chunk"))
    # an X-VILA output model's stages are planned on its whole tree (head + image decoder)
    planned = omni_recipes.model_of(config) if config.get("xvila_output") else lm
    plan, speech_trained = _pick(config, workdir, planned, stage)
    if out is not None:
        # the highway carries the first image; with tiling its thumbnail (its last view), as
        # in training (data.gen_image)
        veh_row = (encoder.num_views(encoder._image(images[0])) - 1) if images else None
        return _image_out(config, omni, tok, workdir, plan, batch, out, image_steps, guidance,
                          seed, veh_row, echo, max_new_tokens)
    if tts == "generator" and not speech_trained:
        raise ValueError(f"--tts=generator but stage {plan.name!r} has no trained speech "
                         f"generator (config.model.speech and a stage training 'speech')")
    use_generator = speak_dir is not None and tts != "espeak" and speech_trained
    vocoder = _vocoder(config, units_dir) if use_generator else None
    params = nn.unbox(omni_recipes.final_params(workdir, plan, lm))
    variables = {"params": {k: v for k, v in params.items() if k not in SPEECH_PARAMS}}
    stops = (tok.eos_id, tok.endoftext_id)  # Qwen2 chat: <|im_end|>, <|endoftext|>
    kw = dict(max_new_tokens=max_new_tokens, eos_id=stops, pad_id=tok.pad_id,
              sampling=sampling, rng=jax.random.key(seed), vocab_limit=tok.vocab_size)
    if not stream and speak_dir is None:
        ids = np.asarray(generate_omni(lm.module, variables, batch, **kw))[0]
        end = np.isin(ids, stops)
        ids = ids[:np.argmax(end)] if end.any() else ids
        answer = tok.decode(ids.tolist()).strip()
        echo(answer)
        return answer
    if use_generator:
        from omni_jax.infer.speech import AudioChunk, SpeechOut, stream_speech

        speech = SpeechOut.from_template(omni.speech, params["speech"], vocoder,
                                         encoder.template)
        text, chunks = [], []
        for ev in stream_speech(lm.module, variables, batch, speech, tok.decode,
                                speech_rng=jax.random.key(seed), **kw):
            if isinstance(ev, AudioChunk):
                chunks.append(ev)
                continue
            text.append(ev.text)
            for s in ev.sentences if stream else ():
                echo(s)
        answer = "".join(text).strip()
        if not stream:
            echo(answer)
        print(_write_speech(speak_dir, chunks), file=sys.stderr)
        return answer
    speak = espeak_tts(speak_dir, voice) if speak_dir is not None else None
    rows = (int(t[0]) for t in stream_omni(lm.module, variables, batch, **kw))
    text, sentences = [], []
    for delta, done in stream_text(rows, tok.decode, eos_id=stops, speak=speak):
        text.append(delta)
        sentences += done
        for s in done if stream else ():
            echo(s)
    answer = "".join(text).strip()
    if not stream:
        echo(answer)
    if speak is not None and speak.paths:
        print(f"spoke {len(speak.paths)} sentence(s) to {speak_dir}", file=sys.stderr)
    return answer


def _image_out(config: ml_collections.ConfigDict, omni: OmniConfig, tok: Any, workdir: str,
               plan: omni_recipes.StagePlan, batch: dict[str, np.ndarray], out: str,
               steps: int, guidance: float, seed: int, veh_row: int | None,
               echo: Callable[[str], None], max_new_tokens: int = 256) -> str:
    """The model answers first; when its answer asks for an image (the K generation tokens
    x2x_textual trains it to emit), the image comes from those positions, its text before them
    is echoed; otherwise the K tokens are appended to the prompt. Then one LLM pass -> the
    image decoder -> PNG at out."""
    import dataclasses

    import flax.linen as nn
    import jax
    from PIL import Image

    from omni_jax.decoders.xvila import PARAM_KEYS, check_generation
    from omni_jax.train.xvila_model import image_to_unit

    model = omni_recipes.model_of(config)  # XVilaLM: head, decoder, the tokenizer's gen id
    head = model.head
    check_generation(head, steps, guidance)
    params = nn.unbox(omni_recipes.final_params(workdir, dataclasses.replace(plan, model=model)))
    lm_vars = {"params": {k: v for k, v in params.items()
                          if k not in PARAM_KEYS and k not in SPEECH_PARAMS}}
    ids = np.asarray(generate_omni(model.lm.module, lm_vars, batch, max_new_tokens=max_new_tokens,
                                   eos_id=(tok.eos_id, tok.endoftext_id), pad_id=tok.pad_id,
                                   vocab_limit=tok.vocab_size))[0]
    asked = np.flatnonzero(ids == tok.gen_image_id)
    if asked.size >= head.gen_tokens:  # the model's own request: its text, then the tokens
        text = tok.decode(ids[:asked[0]].tolist()).strip()
        if text:
            echo(text)
        gen = ids[None, :asked[head.gen_tokens - 1] + 1].astype(batch["input_ids"].dtype)
    else:
        gen = np.full((1, head.gen_tokens), tok.gen_image_id, batch["input_ids"].dtype)
    batch = dict(batch, input_ids=np.concatenate([batch["input_ids"], gen], 1),
                 modality=np.concatenate([batch["modality"], np.zeros_like(gen)], 1))
    if batch.get("media_index") is not None:  # the generation tokens are text
        batch["media_index"] = np.pad(batch["media_index"], ((0, 0), (0, gen.shape[1])),
                                      constant_values=-1)
    has_image = veh_row is not None
    if has_image:
        batch["veh_index"] = np.full((1,), veh_row, np.int32)
    img = model.generate(params, batch, jax.random.key(seed), steps=steps,
                         guidance_scale=guidance, image_to_image=has_image)
    pixels = np.round(image_to_unit(img)[0] * 255).astype(np.uint8)  # [H, W, C]
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(out)
    echo(f"wrote {out} ({pixels.shape[1]}x{pixels.shape[0]}, stage {plan.name})")
    return out


# ---- command line ---------------------------------------------------------------------------
flags.DEFINE_string("prompt", None, "the user's message")
flags.DEFINE_multi_string("image", [], "image file (repeat for several)")
flags.DEFINE_multi_string("audio", [], "audio file (repeat for several)")
flags.DEFINE_multi_string("video", [], "video file or directory of frames (repeatable)")
flags.DEFINE_string("system", None, "system prompt (default: the template's)")
recipes.define_once("integer", "max_new_tokens", 256, "most tokens to generate")
flags.DEFINE_float("temperature", 0.0, "0: greedy; else sample at this temperature")
flags.DEFINE_integer("top_k", 0, "sampling: keep the k most likely tokens (0: all)")
flags.DEFINE_float("top_p", 1.0, "sampling: nucleus mass")
flags.DEFINE_integer("seed", 0, "sampling rng seed")
flags.DEFINE_bool("stream", False, "print the answer sentence by sentence as it decodes")
flags.DEFINE_string("speak_dir", None, "speak each sentence to a wav in this directory")
flags.DEFINE_string("voice", None, "espeak-ng voice (default: cmn for CJK text, else en)")
recipes.define_once("string", "units_dir", None, "unit tokenizer + vocoder directory of the "
                    "speech generator (default: config.speech_units.dir)")
flags.DEFINE_enum("tts", "auto", list(TTS), "speech for --speak_dir: the trained generator "
                  "(auto: when the model has one) or espeak-ng")
flags.DEFINE_string("out", None, "write a generated image (PNG) here instead of a text "
                    "answer; needs an X-VILA image decoder (recipe xvila:output=on)")
flags.DEFINE_integer("image_steps", 50, "--out: DDIM steps")
flags.DEFINE_float("guidance", 3.0, "--out: classifier-free guidance scale (>= 0)")
FLAGS = flags.FLAGS


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    try:
        argv = recipes.resolve_argv(argv)  # recipe names -> config files
        sys.argv = argv  # config_flags finds the --config.* overrides to define in sys.argv
        FLAGS(argv)
        if not FLAGS.workdir or FLAGS.prompt is None:
            raise ValueError("--workdir and --prompt are required")
        config = recipes.config_or_run(FLAGS.config, FLAGS.workdir)
        sampling = GREEDY if FLAGS.temperature == 0 else SamplingConfig(
            greedy=False, temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p)
        run_chat(config, FLAGS.workdir, FLAGS.prompt, stage=FLAGS.stage,
                 images=FLAGS.image, audios=FLAGS.audio, videos=FLAGS.video,
                 system=FLAGS.system, max_new_tokens=FLAGS.max_new_tokens, sampling=sampling,
                 seed=FLAGS.seed, stream=FLAGS.stream, speak_dir=FLAGS.speak_dir,
                 voice=FLAGS.voice, units_dir=FLAGS.units_dir, tts=FLAGS.tts,
                 out=FLAGS.out, image_steps=FLAGS.image_steps, guidance=FLAGS.guidance,
                 echo=lambda s: print(s, flush=True))
    except KeyError as e:  # a --config.a.b override naming no field
        print(f"error: bad --config override: no field {e}", file=sys.stderr)
        return 2
    except (ValueError, flags.Error) as e:
        print(f"error: {recipes.error_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
