"""Export an omni_digits split as the project's JSONL manifests with media files.

`write_manifests(builder_or_dir, out_dir, split)` writes into out_dir
  <task>.jsonl           one manifest per task: the names of omni_jax/configs/common.py SOURCES
                         (image_caption, image_qa, video_qa, speech_asr, text_chat,
                         speech_response, speech_dpo) plus spoken_image_qa, video_spoken_qa
  images/digit_NNNN.png  each digit image once (sklearn index), also the frames of videos
  audio/<id>.wav         user speech (16 kHz int16 mono)
  units/                 the dataset's unit tokenizer + vocoder (speech_units' vocabulary)
Records are ChatML conversations in the parts format of omni_jax.data.template ({"type":
"image" | "video" | "audio" | "text"} parts) with media refs "images" / "videos" (a list of
frame paths per video) / "audios", relative to the manifest; speech tasks add
"speech_units" (and "speech_units_rejected" for DPO) as omni_jax.data.speech reads them.
Each manifest is read back with omni_jax.data.sources.JsonlSource(on_corrupt="raise").

CLI (builds the dataset first when needed, then exports every split to OUT/<split>/):
    python -m omni_jax.data.omni_digits.export --out DIR --config small|ci|full [--data_dir D]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
import wave
from collections.abc import Sequence
from typing import Any

import numpy as np

# SOURCE_MODALITIES: media each exported source holds (the recipes' names and modalities)
from omni_jax.configs.common import SOURCE_MODALITIES  # noqa: F401  (re-exported)
from omni_jax.data.omni_digits import tasks as T
from omni_jax.data.omni_digits import voices as V


def _wav(pcm: np.ndarray, rate: int = V.SAMPLE_RATE) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(pcm, "<i2").tobytes())
    return buf.getvalue()


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes | np.bytes_) else str(v)


def open_builder(data_dir_or_builder: Any, config: str = "small") -> Any:
    """A prepared omni_digits builder from a builder, a dataset directory (holding
    dataset_info.json) or a TFDS data_dir root (with `config`)."""
    import tensorflow_datasets as tfds

    from omni_jax.data.omni_digits.builder import make_builder

    if isinstance(data_dir_or_builder, tfds.core.DatasetBuilder):
        builder = data_dir_or_builder
    elif isinstance(data_dir_or_builder, str | os.PathLike):
        path = os.fspath(data_dir_or_builder)
        if not os.path.isdir(path):
            raise ValueError(f"write_manifests: {path!r} is not a directory; expected an "
                             f"omni_digits builder, dataset dir or TFDS data_dir")
        if os.path.isfile(os.path.join(path, "dataset_info.json")):
            builder = tfds.builder_from_directory(path)
        else:
            builder = make_builder(config, path)
    else:
        raise ValueError(f"write_manifests: expected a builder or a directory path, got "
                         f"{type(data_dir_or_builder).__name__}")
    if builder.name != "omni_digits" or not builder.is_prepared():
        raise ValueError(f"write_manifests: {builder.name!r} at {builder.data_dir} is not a "
                         f"prepared omni_digits dataset; build it first (omni_digits.prepare "
                         f"or this module's CLI)")
    return builder


def _check_out(out_dir: str | os.PathLike) -> str:
    out = os.fspath(out_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"write_manifests: out_dir {out!r} exists and is not a directory; "
                         f"expected a (possibly new) directory")
    return out


def to_record(ex: dict[str, Any], image_ref: Any, audio_ref: Any) -> dict[str, Any]:
    """A decoded dataset example -> a manifest record; image_ref(sklearn index) and
    audio_ref(id, pcm) write the media and return their relative paths."""
    task, rid = _text(ex["task"]), _text(ex["id"])
    if task not in T.TASKS:
        raise ValueError(f"record {rid!r}: unknown task {task!r}; expected one of "
                         f"{list(T.TASKS)}")
    prompt, parts = _text(ex["prompt"]), []
    rec: dict[str, Any] = {"id": rid, "task": task}
    index = [int(i) for i in ex["image_index"]]
    for kind in T.TASKS[task]:
        if kind == "text":
            parts.append({"type": "text", "text": prompt})
            continue
        parts.append({"type": kind})
        if kind == "image":
            rec["images"] = [image_ref(index[0])]
        elif kind == "video":
            rec["videos"] = [[image_ref(i) for i in index]]
        else:
            rec["audios"] = [audio_ref(rid, ex["audio"])]
            rec["voice"] = _text(ex["voice"])
            if task != "speech_asr":
                rec["question_text"] = prompt  # the spoken question's transcript
    if task in T.IMAGE_OUT:  # the assistant's turn is the image (omni_jax.data.gen_image)
        answer: Any = [{"type": "gen_image"}]
        target = int(ex["target_index"][0])
        rec["gen_image"], rec["target_index"] = image_ref(target), target
    else:
        answer = _text(ex["answer"])
    rec["messages"] = [{"role": "user", "content": parts},
                       {"role": "assistant", "content": answer}]
    rec["digits"] = [int(d) for d in ex["digits"]]
    if index:
        rec["image_index"] = index
    if task in T.SPEECH_OUT:
        style = _text(ex["style"])
        rec["speech_units"] = [int(u) for u in ex["speech_units"]]
        rec["speech_source"] = f"espeak-ng:{_text(ex['voice'])}:{style}"
        if task == "speech_dpo":
            rec["speech_units_rejected"] = [int(u) for u in ex["speech_units_rejected"]]
            rec["speech_source_rejected"] = (f"espeak-ng:{_text(ex['voice'])}:"
                                             f"{_text(ex['style_rejected'])}")
    return rec


def write_manifests(data_dir_or_builder: Any, out_dir: str | os.PathLike, split: str, *,
                    config: str = "small", image_scale: int = 8) -> dict[str, str]:
    """Write a split's manifests + media into out_dir -> {source name: manifest path,
    "units_dir": path}. Every manifest is validated with the project's JsonlSource."""
    from omni_jax.data.fixtures import _png
    from omni_jax.data.omni_digits.builder import units_dir
    from omni_jax.data.sources import JsonlSource

    if not isinstance(image_scale, int) or image_scale < 1:
        raise ValueError(f"write_manifests: image_scale must be an int >= 1, got "
                         f"{image_scale!r}")
    out = _check_out(out_dir)
    builder = open_builder(data_dir_or_builder, config)
    if split not in builder.info.splits:
        raise ValueError(f"write_manifests: unknown split {split!r}; expected one of "
                         f"{sorted(builder.info.splits)}")
    source = builder.as_data_source(split=split)
    for sub in ("images", "audio"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    pixels, _ = T.load_images()
    written: set[int] = set()

    def image_ref(idx: int) -> str:
        rel = f"images/digit_{idx:04d}.png"
        if idx not in written:
            with open(os.path.join(out, rel), "wb") as f:
                f.write(_png(pixels[idx] / 255.0 * 16.0, image_scale))  # _png takes 0..16
            written.add(idx)
        return rel

    def audio_ref(rid: str, pcm: np.ndarray) -> str:
        rel = f"audio/{rid}.wav"
        with open(os.path.join(out, rel), "wb") as f:
            f.write(_wav(pcm))
        return rel

    by_task: dict[str, list[dict[str, Any]]] = {t: [] for t in T.TASKS}
    for i in range(len(source)):
        rec = to_record(source[i], image_ref, audio_ref)
        by_task[rec["task"]].append(rec)
    paths: dict[str, str] = {}
    for task, recs in by_task.items():
        recs.sort(key=lambda r: r["id"])
        path = os.path.join(out, f"{task}.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
        if recs and len(JsonlSource(path, on_corrupt="raise")) != len(recs):
            raise ValueError(f"write_manifests: {path} reads back a different record count")
        paths[task] = path
    paths["units_dir"] = os.path.join(out, "units")
    shutil.copytree(units_dir(builder), paths["units_dir"], dirs_exist_ok=True)
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI: build (if needed) and export train / validation / test -> a summary dict."""
    import tensorflow_datasets as tfds

    from omni_jax.data.omni_digits.builder import make_builder, prepare

    p = argparse.ArgumentParser(prog="python -m omni_jax.data.omni_digits.export",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory (one subdir per split)")
    p.add_argument("--config", default="small", help="small | ci | full")
    p.add_argument("--data_dir", default=None, help="TFDS data_dir (default: OUT/tfds)")
    p.add_argument("--image_scale", type=int, default=8, help="PNG upscaling of the 8x8 digits")
    args = p.parse_args(argv)
    out = _check_out(args.out)
    data_dir = args.data_dir or os.path.join(out, "tfds")
    tfds.disable_progress_bar()
    t0 = time.time()
    was_ready = make_builder(args.config, data_dir).is_prepared()
    builder = prepare(args.config, data_dir)
    summary: dict[str, Any] = {"config": args.config, "dataset_dir": os.fspath(builder.data_dir),
                               "build_seconds": None if was_ready else round(time.time() - t0, 1),
                               "splits": {}}
    for split in V.SPLITS:
        paths = write_manifests(builder, os.path.join(out, split), split,
                                image_scale=args.image_scale)
        counts = {}
        for task in T.TASKS:
            with open(paths[task]) as f:
                counts[task] = sum(1 for line in f if line.strip())
        summary["splits"][split] = counts
    summary["export_seconds"] = round(time.time() - t0, 1)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
