"""Checkpoint kinds (qwen2, siglip_vision, clip_vision, whisper_encoder): detection, import,
export, native IO.

The native format is a directory with `omni_jax.json` ({"kind", "config", "hf_config"}) and an
orbax `params/` checkpoint. `hf_config` keeps the original config.json so an export restores
fields we do not model (token ids, names).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from typing import Any

import numpy as np

from omni_jax.convert import io
from omni_jax.utils import fs

# kind -> (module, import fn, export fn, config class path)
KINDS: dict[str, tuple[str, str, str, str]] = {
    "qwen2": ("omni_jax.convert.qwen2", "import_qwen2", "export_qwen2",
              "omni_jax.llm.config:LLMConfig"),
    "siglip_vision": ("omni_jax.convert.siglip", "import_siglip_vision", "export_siglip_vision",
                      "omni_jax.encoders.vision:SiglipVisionConfig"),
    "clip_vision": ("omni_jax.convert.clip", "import_clip_vision", "export_clip_vision",
                    "omni_jax.encoders.vision:SiglipVisionConfig"),
    # a whole model: its config is an OmniConfig.from_dict dict, kept as such
    "ovis2": ("omni_jax.convert.ovis2", "import_ovis2", "export_ovis2", ""),
    "whisper_encoder": ("omni_jax.convert.whisper", "import_whisper_encoder",
                        "export_whisper_encoder", "omni_jax.encoders.audio:WhisperEncoderConfig"),
}
NATIVE_META = "omni_jax.json"


def detect_kind(hf_config: dict[str, Any]) -> str:
    """Which converter handles a config.json; ValueError for unsupported models."""
    model_type = hf_config.get("model_type")
    arch = hf_config.get("architectures") or []
    if model_type == "qwen2":
        return "qwen2"
    if model_type in ("siglip", "siglip_vision_model"):
        return "siglip_vision"
    if model_type == "ovis2":
        return "ovis2"
    if model_type in ("clip", "clip_vision_model"):
        return "clip_vision"
    if model_type == "whisper":
        return "whisper_encoder"
    raise ValueError(f"unsupported checkpoint: model_type={model_type!r} architectures={arch}; "
                     f"supported: qwen2, siglip / siglip_vision_model, clip / clip_vision_model, "
                     f"whisper, ovis2")


def _fn(kind: str, which: int):
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {sorted(KINDS)}")
    return getattr(importlib.import_module(KINDS[kind][0]), KINDS[kind][which])


def _config_cls(kind: str):
    if not KINDS[kind][3]:  # dict configs (whole models)
        return None
    mod, cls = KINDS[kind][3].split(":")
    return getattr(importlib.import_module(mod), cls)


def _load_config(kind: str, d: dict[str, Any]) -> Any:
    cls = _config_cls(kind)
    return dict(d) if cls is None else cls.from_dict(d)


def import_hf(path: str, **overrides: Any) -> tuple[str, Any, dict[str, Any], dict[str, Any]]:
    """HF directory -> (kind, config, {"params": ...}, original config.json)."""
    hf_config = io.read_config(path)
    kind = detect_kind(hf_config)
    config, params = _fn(kind, 1)(path, **overrides)
    return kind, config, params, hf_config


def export_hf(kind: str, config: Any, params: dict[str, Any], out_dir: str,
              hf_config: dict[str, Any] | None = None, *, dtype: str | None = None,
              max_shard_bytes: int | None = None) -> None:
    """Write a directory transformers loads (see each kind's export function). qwen2: in the
    source checkpoint's dtype unless `dtype` is given, sharded above max_shard_bytes."""
    fn = _fn(kind, 2)
    if kind in ("qwen2", "ovis2"):
        fn(config, params, out_dir, base_config=hf_config, dtype=dtype,
           max_shard_bytes=max_shard_bytes or io.MAX_SHARD_BYTES)
    elif dtype is not None or max_shard_bytes is not None:
        raise ValueError(f"export of a {kind} checkpoint keeps its stored dtype in one file; "
                         f"--dtype / --max_shard_size apply to qwen2 LLMs")
    else:
        fn(config, params, out_dir)


def save_native(out_dir: str, kind: str, config: Any, params: dict[str, Any],
                hf_config: dict[str, Any] | None = None) -> None:
    """Write (kind, config, params) as omni_jax's native checkpoint directory."""
    import orbax.checkpoint as ocp

    out_dir = fs.abspath(out_dir)
    fs.makedirs(out_dir)
    cfg = config if isinstance(config, dict) else dataclasses.asdict(config)
    meta = {"kind": kind, "config": cfg, "hf_config": hf_config}
    params_np = _to_numpy(params)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(fs.join(out_dir, "params"), params_np, force=True)
    fs.write_text(fs.join(out_dir, NATIVE_META), json.dumps(meta, indent=2))  # last: complete


def load_native(path: str) -> tuple[str, Any, dict[str, Any], dict[str, Any] | None]:
    """Read a native checkpoint directory -> (kind, config, params, hf_config)."""
    import orbax.checkpoint as ocp

    path = fs.abspath(path)
    meta_file = fs.join(path, NATIVE_META)
    if not fs.isfile(meta_file):
        raise ValueError(f"{path!r} is not an omni_jax checkpoint: no {NATIVE_META}")
    meta = json.loads(fs.read_text(meta_file))
    kind = meta.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{meta_file}: unknown kind {kind!r}; expected one of {sorted(KINDS)}")
    config = _load_config(kind, meta["config"])
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(fs.join(path, "params"))
    return kind, config, _to_numpy(params), meta.get("hf_config")


def read_native(path: str, kind: str) -> tuple[dict[str, Any], Any]:
    """(omni_jax.json contents, params tree) of a native directory that must hold `kind` (the
    converters with their own config parsing: openomni_speech, beats_encoder, ola)."""
    import orbax.checkpoint as ocp

    path = fs.abspath(path)
    meta_file = fs.join(path, NATIVE_META)
    if not fs.isfile(meta_file):
        raise ValueError(f"{path!r} is not an omni_jax checkpoint: no {NATIVE_META}")
    meta = json.loads(fs.read_text(meta_file))
    if meta.get("kind") != kind:
        raise ValueError(f"{meta_file}: kind {meta.get('kind')!r} is not {kind!r}")
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(fs.join(path, "params"))
    return meta, params


def native_meta(path: str) -> tuple[str, Any]:
    """(kind, config) of a native checkpoint directory, without reading its tensors."""
    meta_file = fs.join(fs.abspath(path), NATIVE_META)
    if not fs.isfile(meta_file):
        raise ValueError(f"{path!r} is not an omni_jax checkpoint: no {NATIVE_META}")
    meta = json.loads(fs.read_text(meta_file))
    if meta.get("kind") not in KINDS:
        raise ValueError(f"{meta_file}: unknown kind {meta.get('kind')!r}; expected one of "
                         f"{sorted(KINDS)}")
    return meta["kind"], _load_config(meta["kind"], meta["config"])


def native_shapes(path: str) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{"a/b/kernel": (shape, dtype)} of a native checkpoint's params, from orbax metadata."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(fs.join(fs.abspath(path), "params"))
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    tree = tree.get("params", tree) if isinstance(tree, dict) else tree
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in p): (tuple(x.shape), x.dtype)
            for p, x in flat}


def restore_native_sharded(path: str, abstract: Any) -> Any:
    """The params of a native checkpoint that `abstract` names (ShapeDtypeStructs with
    .sharding), read by each process straight into its shards (no full host copy)."""
    import jax
    import orbax.checkpoint as ocp

    params_dir = fs.join(fs.abspath(path), "params")
    with ocp.StandardCheckpointer() as ckpt:
        top = getattr(ckpt.metadata(params_dir), "item_metadata", None)
    top = getattr(top, "tree", top)
    item = {"params": abstract} if isinstance(top, dict) and set(top) == {"params"} else abstract
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(
        sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), item)
    with ocp.PyTreeCheckpointer() as ckpt:
        out = ckpt.restore(params_dir, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
    return out["params"] if item is not abstract else out


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)
