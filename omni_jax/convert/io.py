"""Reading and writing Hugging Face checkpoint directories (config.json + safetensors)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors.numpy import load, load_file, save, save_file

from omni_jax.utils import fs

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def read_config(path: str) -> dict[str, Any]:
    """config.json of a checkpoint directory as a dict; ValueError if absent or not JSON."""
    cfg = fs.join(path, "config.json")
    if not fs.isfile(cfg):
        raise ValueError(f"{path!r} is not a Hugging Face checkpoint directory: no config.json")
    try:
        return json.loads(fs.read_text(cfg))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg}: not valid JSON ({e})") from e


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a directory: model.safetensors or the shards named by its index file."""
    index = fs.join(path, INDEX_NAME)
    single = fs.join(path, WEIGHTS_NAME)
    if fs.isfile(index):
        weight_map = json.loads(fs.read_text(index)).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: expected a 'weight_map' object")
        files = sorted(set(weight_map.values()))
    elif fs.isfile(single):
        files = [WEIGHTS_NAME]
    else:
        raise ValueError(f"{path!r}: no {WEIGHTS_NAME} or {INDEX_NAME} (only safetensors "
                         "checkpoints are supported)")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        fp = fs.join(path, name)
        if not fs.isfile(fp):
            raise ValueError(f"{path!r}: shard {name!r} named in the index is missing")
        try:
            tensors.update(load(fs.read_bytes(fp)) if fs.is_url(fp) else load_file(fp))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{fp}: cannot read safetensors file ({e})") from e
    return tensors


def check_tensors(got: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
                  what: str, ignore_unexpected: tuple[str, ...] = ()) -> None:
    """Raise one ValueError listing missing keys, unexpected keys and wrong shapes."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(k for k in set(got) - set(expected)
                        if not any(k.startswith(p) for p in ignore_unexpected))
    wrong = sorted(f"{k}: expected {tuple(expected[k])}, got {tuple(got[k].shape)}"
                   for k in set(got) & set(expected) if tuple(got[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if wrong:
        problems.append(f"wrong shapes [{'; '.join(wrong)}]")
    if problems:
        raise ValueError(f"{what} checkpoint does not match its config: " + ", ".join(problems))


def write_checkpoint(out_dir: str, config: Mapping[str, Any],
                     tensors: Mapping[str, np.ndarray]) -> None:
    """Write config.json + model.safetensors (float tensors kept in their dtype)."""
    fs.makedirs(out_dir)
    fs.write_text(fs.join(out_dir, "config.json"), json.dumps(dict(config), indent=2,
                                                               sort_keys=True))
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
    target = fs.join(out_dir, WEIGHTS_NAME)
    if fs.is_url(target):
        with fs.open(target, "wb") as f:
            f.write(save(arrays, metadata={"format": "pt"}))
    else:
        save_file(arrays, target, metadata={"format": "pt"})
