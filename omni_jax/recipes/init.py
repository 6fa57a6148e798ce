"""Pretrained init: where each part of a recipe's model starts (config.init).

  init.llm     a Qwen2 Hugging Face directory (config.json + safetensors, sharded index too) or
               an omni_jax native checkpoint (cli.convert import-hf)  -> params["llm"]
  init.image   a SigLIP or CLIP directory / native checkpoint         -> params["image_encoder"]
  init.video   the same, for a video tower with its own encoder       -> params["video_encoder"]
  init.audio   a Whisper directory, OpenAI whisper .pt or native checkpoint (plain Whisper)
                                                                      -> params["audio_encoder"]
  init.speech  an OpenOmni speech-generator state dict (.bin/.pt/.safetensors, dir) or a
               native `openomni_speech` checkpoint                    -> params["speech"]
  init.model   a seed's released whole model as an omni_jax native checkpoint: kind "ola"
               (convert.ola.save_ola) or "ovis2" (cli.convert import-hf) -> every top-level
               part it holds that the model has (llm, encoders, adapters); the model's other
               parts start fresh, parts the model lacks are dropped with a warning. Combined
               with per-part entries, the per-part entries win (init.llm replaces the
               checkpoint's llm). The LLM's and encoders' structural config fields must equal
               the model's, and each part it holds must cover the model's part, same shapes.
Otherwise adapters and new vectors start fresh. Each checkpoint must describe the configured
part: its structural hyper-parameters (widths, layers, heads, vocab, rope, eps, ...) equal the
config's, and its tensors cover the part's parameters with the same shapes; otherwise one
ValueError lists every mismatch before any compute. Tensors the part does not use (e.g.
SigLIP's post-LayerNorm when the tower reads an inner layer) are dropped with a warning. A
native checkpoint (cli.convert import-hf: the way in for a 7B) is restored by orbax straight
into the parameters' shardings, each process reading only its shards; HF directories and torch
files are read on the host and placed in their shardings by the trainer's init.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from omni_jax.convert.tree import flatten, unflatten
from omni_jax.omni_config import OmniConfig
from omni_jax.utils import fs

log = logging.getLogger(__name__)
PARTS = {"llm": "llm", "image": "image_encoder", "video": "video_encoder",
         "audio": "audio_encoder", "speech": "speech"}
MODEL = "model"  # config.init key of a whole-model checkpoint
WHOLE_KINDS = ("ola", "ovis2")  # native kinds holding a whole OmniModel
# config fields that do not change the weights' meaning (compute settings, which layer is read)
RUNTIME_FIELDS = {"dtype", "param_dtype", "scan_layers", "remat_policy", "select_layer",
                  "use_post_layernorm", "pos_interp", "initializer_range",
                  "max_position_embeddings", "mask_padding", "feature"}


def part_config(omni: OmniConfig, part: str) -> Any:
    """The configured part's own config; ValueError if the model has no such part."""
    if part == "llm":
        return omni.llm
    if part == "speech":
        if omni.speech is None:
            raise ValueError("init.speech is set but the model has no speech generator")
        return omni.speech
    tower = getattr(omni, part)
    if tower is None:
        raise ValueError(f"init.{part} is set but the model has no {part} tower")
    if tower.shared_with:
        raise ValueError(f"init.{part}: the {part} tower shares the {tower.shared_with} "
                         f"encoder; set init.{tower.shared_with} instead")
    if tower.encoder not in ("siglip", "whisper"):
        raise ValueError(f"init.{part}: encoder {tower.encoder!r} has no checkpoint importer "
                         f"(supported: siglip, whisper)")
    return tower.encoder_config


def _read(part: str, path: str, config: Any) -> tuple[Any, dict[str, Any]]:
    """Checkpoint -> (its config, params tree of numpy arrays)."""
    from omni_jax.convert import registry

    if not fs.exists(path):
        raise ValueError(f"init.{part}: {path!r} does not exist")
    if part == "speech":
        from omni_jax.convert.openomni import import_openomni, load_native_openomni

        if fs.isfile(fs.join(path, registry.NATIVE_META)):
            loaded_cfg, params = load_native_openomni(path)[:2]
        else:
            loaded_cfg, params = config, import_openomni(path, config)
        return loaded_cfg, params.get("params", params)
    if part == "audio" and fs.isfile(path) and path.endswith(".pt"):
        from omni_jax.convert.whisper_openai import import_whisper_pt

        loaded_cfg, params = import_whisper_pt(path, expect=config)
        return loaded_cfg, params["params"]
    if fs.isfile(fs.join(path, registry.NATIVE_META)):
        kind, loaded_cfg, params, _ = registry.load_native(path)
    elif fs.isfile(fs.join(path, "config.json")):
        kind, loaded_cfg, params, _ = registry.import_hf(path)
    else:
        raise ValueError(f"init.{part}: {path!r} is neither a Hugging Face directory "
                         f"(config.json) nor an omni_jax checkpoint ({registry.NATIVE_META})")
    want = {"llm": ("qwen2",), "image": ("siglip_vision", "clip_vision"),
            "video": ("siglip_vision", "clip_vision"), "audio": ("whisper_encoder",)}[part]
    if kind not in want:
        raise ValueError(f"init.{part}: {path!r} holds a {kind} checkpoint; expected "
                         f"{' or '.join(want)}")
    params = params.get("params", params)
    if part == "llm" and getattr(loaded_cfg, "scan_layers", False) != config.scan_layers:
        from omni_jax.convert.tree import stack_layers, unstack_layers

        n = config.num_layers
        params = stack_layers(params, n) if config.scan_layers else unstack_layers(params, n)
    return loaded_cfg, params


def _config_diff(loaded: Any, config: Any) -> list[str]:
    a, b = dataclasses.asdict(loaded), dataclasses.asdict(config)
    out = []
    for k in sorted(set(a) & set(b) - RUNTIME_FIELDS):
        if isinstance(a[k], dict) and isinstance(b[k], dict):
            sub = [f"{k}.{x}" for x in sorted(set(a[k]) & set(b[k]) - RUNTIME_FIELDS)
                   if a[k][x] != b[k][x]]
            out += [f"{s}: checkpoint {a[k][s.split('.', 1)[1]]!r}, config "
                    f"{b[k][s.split('.', 1)[1]]!r}" for s in sub]
        elif a[k] != b[k]:
            out.append(f"{k}: checkpoint {a[k]!r}, config {b[k]!r}")
    return out


def _sharded(abstract: Mapping[str, Any]) -> bool:
    return all(getattr(a, "sharding", None) is not None for a in flatten(abstract).values())


def _load_native_sharded(part: str, path: str, config: Any, abstract: Mapping[str, Any]
                         ) -> Any | None:
    """A native checkpoint read per shard into abstract's shardings; None when it needs the
    host path (another layer layout, a kind with its own reader)."""
    from omni_jax.convert import registry

    if part == "speech" or not _sharded(abstract):
        return None
    kind, loaded_cfg = registry.native_meta(path)
    if kind not in ("qwen2", "siglip_vision", "clip_vision", "whisper_encoder"):
        return None
    if part == "llm" and getattr(loaded_cfg, "scan_layers", False) != config.scan_layers:
        return None  # stacked <-> per-layer: re-laid out on the host
    problems = _config_diff(loaded_cfg, config)
    shapes, want = registry.native_shapes(path), flatten(abstract)
    problems += [f"missing {k} {tuple(v.shape)}" for k, v in want.items() if k not in shapes]
    problems += [f"{k}: checkpoint shape {shapes[k][0]}, model {tuple(v.shape)}"
                 for k, v in want.items() if k in shapes and shapes[k][0] != tuple(v.shape)]
    if problems:
        raise ValueError(f"init.{part} = {path!r} does not match the model's {part}:\n  "
                         + "\n  ".join(problems))
    unused = sorted(set(shapes) - set(want))
    if unused:
        log.warning("init.%s: %d checkpoint tensors unused by the model (%s%s)", part,
                    len(unused), ", ".join(unused[:4]), ", ..." if len(unused) > 4 else "")
    return registry.restore_native_sharded(path, unflatten(dict(want)))


def load_part(part: str, path: str, omni: OmniConfig, abstract: Mapping[str, Any]) -> Any:
    """One part's params from its checkpoint, checked against the abstract params subtree.
    Native checkpoints restore per shard into abstract's shardings when it has them; other
    formats (HF directories, torch files) are read on the host and placed by the trainer."""
    config = part_config(omni, part)
    if fs.isfile(fs.join(path, "omni_jax.json")):
        restored = _load_native_sharded(part, path, config, abstract)
        if restored is not None:
            return restored
    loaded_cfg, params = _read(part, path, config)
    problems = _config_diff(loaded_cfg, config)
    got, want = flatten(params), flatten(abstract)
    problems += [f"missing {k} {tuple(v.shape)}" for k, v in want.items() if k not in got]
    problems += [f"{k}: checkpoint shape {tuple(np.shape(got[k]))}, model {tuple(v.shape)}"
                 for k, v in want.items() if k in got and tuple(np.shape(got[k])) != v.shape]
    if problems:
        raise ValueError(f"init.{part} = {path!r} does not match the model's {part}:\n  "
                         + "\n  ".join(problems))
    unused = sorted(set(got) - set(want))
    if unused:
        log.warning("init.%s: %d checkpoint tensors unused by the model (%s%s)", part,
                    len(unused), ", ".join(unused[:4]), ", ..." if len(unused) > 4 else "")
    return unflatten({k: np.asarray(got[k], dtype=want[k].dtype) for k in want})


# fields of whole-model encoder configs that do not change the weights' meaning either
MODEL_RUNTIME_FIELDS = RUNTIME_FIELDS | {"chunk_seconds", "max_chunks", "align", "sample_rate",
                                         "mel_hop_length"}


def _model_meta(path: str) -> tuple[str, dict[str, Any]]:
    """(kind, config dict) of a whole-model native checkpoint, without reading its tensors."""
    import json

    from omni_jax.convert import registry

    if not fs.exists(path):
        raise ValueError(f"init.model: {path!r} does not exist")
    meta_file = fs.join(path, registry.NATIVE_META)
    if not fs.isfile(meta_file):
        raise ValueError(f"init.model: {path!r} is not an omni_jax native checkpoint (no "
                         f"{registry.NATIVE_META}); import the release first (cli.convert "
                         f"import-ola / import-hf)")
    meta = json.loads(fs.read_text(meta_file))
    kind = meta.get("kind")
    if kind not in WHOLE_KINDS:
        raise ValueError(f"init.model: {path!r} holds a {kind} checkpoint; expected a whole "
                         f"model ({' or '.join(WHOLE_KINDS)}); a single part goes in "
                         f"init.{'/'.join(PARTS)}")
    return kind, meta["config"]


def _read_model(path: str, kind: str) -> dict[str, Any]:
    """A whole-model native checkpoint's params tree (numpy, on the host)."""
    if kind == "ola":
        from omni_jax.convert.ola import load_ola

        params = load_ola(path)[1]
    else:
        from omni_jax.convert import registry

        params = registry.load_native(path)[2]
    return params.get("params", params)


def _model_config_diff(loaded: OmniConfig, omni: OmniConfig, held: set[str]) -> list[str]:
    """Structural config differences of the parts the checkpoint holds (LLM, encoders)."""
    out = [f"llm.{d}" for d in _config_diff(loaded.llm, omni.llm)] if "llm" in held else []
    for m in ("image", "video", "audio"):
        a, b = getattr(loaded, m), getattr(omni, m)
        if f"{m}_encoder" not in held or a is None or b is None or b.shared_with:
            continue
        if a.encoder != b.encoder:
            out.append(f"{m}.encoder: checkpoint {a.encoder!r}, config {b.encoder!r}")
            continue
        x, y = dataclasses.asdict(a.encoder_config), dataclasses.asdict(b.encoder_config)
        for k in sorted(set(x) & set(y) - MODEL_RUNTIME_FIELDS):
            sub = (x[k], y[k]) if not isinstance(x[k], dict) else (
                {i: v for i, v in x[k].items() if i not in RUNTIME_FIELDS},
                {i: v for i, v in (y[k] or {}).items() if i not in RUNTIME_FIELDS})
            if sub[0] != sub[1]:
                out.append(f"{m}.encoder_config.{k}: checkpoint {sub[0]!r}, config {sub[1]!r}")
    return out


def load_model(path: str, omni: OmniConfig, abstract: Mapping[str, Any]) -> dict[str, Any]:
    """init.model: {top-level param key: params} for every part of the whole-model checkpoint
    at `path` that the model has; all problems (structural config fields, missing tensors,
    shapes) in one ValueError before any tensor is read."""
    from omni_jax.convert import registry

    kind, meta_config = _model_meta(path)
    loaded = OmniConfig.from_dict(meta_config)
    shapes = registry.native_shapes(path)  # {"llm/...": (shape, dtype)}
    held = {k.split("/", 1)[0] for k in shapes}
    parts = sorted(held & set(abstract))
    want = flatten({p: abstract[p] for p in parts})
    relayout = "llm" in held and loaded.llm.scan_layers != omni.llm.scan_layers
    problems = _model_config_diff(loaded, omni, held)
    if not relayout:  # stacked <-> per-layer LLM: its shapes are compared after re-layout
        problems += [f"missing {k} {tuple(v.shape)}" for k, v in want.items() if k not in shapes]
        problems += [f"{k}: checkpoint shape {shapes[k][0]}, model {tuple(v.shape)}"
                     for k, v in want.items() if k in shapes and shapes[k][0] != tuple(v.shape)]
    if problems:
        raise ValueError(f"init.model = {path!r} ({kind}) does not match the model:\n  "
                         + "\n  ".join(problems))
    if not parts:
        raise ValueError(f"init.model = {path!r} ({kind}) holds none of the model's parts: it "
                         f"has {sorted(held)}, the model {sorted(abstract)}")
    unused = sorted(held - set(abstract))
    if unused:
        log.warning("init.model: checkpoint parts unused by the model: %s", ", ".join(unused))
    log.info("init.model: %s from %s; fresh: %s", ", ".join(parts), path,
             ", ".join(sorted(set(abstract) - held)) or "nothing")
    if _sharded(abstract) and not relayout:  # each process reads its shards only
        return registry.restore_native_sharded(path, unflatten(dict(want)))
    got = _read_model(path, kind)
    if relayout:
        from omni_jax.convert.tree import stack_layers, unstack_layers

        n = omni.llm.num_layers
        got["llm"] = stack_layers(got["llm"], n) if omni.llm.scan_layers else \
            unstack_layers(got["llm"], n)
    return load_tree(f"init.model = {path!r}", {p: got[p] for p in parts},
                     {p: abstract[p] for p in parts})


def load_tree(what: str, params: Mapping[str, Any], abstract: Mapping[str, Any]
              ) -> dict[str, Any]:
    """params checked against abstract (every leaf present, same shape; one ValueError) and
    cast to its dtypes; extra tensors dropped."""
    got, want = flatten(params), flatten(abstract)
    problems = [f"missing {k} {tuple(v.shape)}" for k, v in want.items() if k not in got]
    problems += [f"{k}: checkpoint shape {tuple(np.shape(got[k]))}, model {tuple(v.shape)}"
                 for k, v in want.items() if k in got and tuple(np.shape(got[k])) != v.shape]
    if problems:
        raise ValueError(f"{what} does not match the model:\n  " + "\n  ".join(problems))
    return unflatten({k: np.asarray(got[k], dtype=want[k].dtype) for k in want})


def load_init(init: Mapping[str, str] | None, omni: OmniConfig, abstract: Mapping[str, Any]
              ) -> dict[str, Any]:
    """config.init -> {top-level param key: params} for the parts that name a checkpoint
    (init.model first, then the per-part entries over it)."""
    init = {k: v for k, v in dict(init or {}).items() if v}
    unknown = sorted(set(init) - set(PARTS) - {MODEL})
    if unknown:
        raise ValueError(f"init: unknown parts {unknown}; expected a subset of "
                         f"{sorted([*PARTS, MODEL])}")
    out = load_model(str(init.pop(MODEL)), omni, abstract) if MODEL in init else {}
    out.update({PARTS[p]: load_part(p, str(path), omni, abstract.get(PARTS[p], {}))
                for p, path in init.items()})
    return out
