"""Reading and writing Hugging Face checkpoint directories (config.json + safetensors).

The safetensors format is read and written here directly (an 8-byte header length, a JSON
header, raw little-endian tensors) so every dtype a checkpoint holds works, bfloat16 and the
float8s included (numpy names them through ml_dtypes); local files are memory-mapped, so a
tensor is read when it is used. Exports keep the tensors' dtype and shard like
save_pretrained (model-0000i-of-0000n.safetensors + model.safetensors.index.json).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from omni_jax.utils import fs

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 2 ** 30  # transformers' save_pretrained default (5GB)
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
          "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
TORCH_NAMES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16",
               "float64": "float64"}


def load_safetensors(path: str) -> dict[str, np.ndarray]:
    """One safetensors file -> {name: array} (memory-mapped when local); ValueError if corrupt."""
    if fs.is_url(path):
        buf = np.frombuffer(fs.read_bytes(path), np.uint8)
    else:
        buf = np.memmap(path, np.uint8, mode="c")  # copy-on-write: callers may edit
    if buf.size < 8:
        raise ValueError("file shorter than the 8-byte safetensors header length")
    (n,) = struct.unpack("<Q", bytes(buf[:8]))
    if n > buf.size - 8:
        raise ValueError(f"header length {n} exceeds the file size {buf.size}")
    try:
        header = json.loads(bytes(buf[8:8 + n]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"bad safetensors header ({e})") from e
    header.pop("__metadata__", None)
    data, out = buf[8 + n:], {}
    for name, info in header.items():
        code, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        if code not in DTYPES:
            raise ValueError(f"tensor {name!r}: unsupported dtype {code}")
        dtype = np.dtype(DTYPES[code])
        if end - start != int(np.prod(shape)) * dtype.itemsize or end > data.size:
            raise ValueError(f"tensor {name!r}: data offsets {start}:{end} do not fit its "
                             f"shape {shape} x {dtype.itemsize} bytes")
        out[name] = data[start:end].view(dtype).reshape(shape)
    return out


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str,
                     metadata: Mapping[str, str] | None = None) -> None:
    """{name: array} -> one safetensors file (any DTYPES dtype, kept as is)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    arrays, offset = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[name]))
        if a.dtype not in CODES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors code")
        header[name] = {"dtype": CODES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        arrays.append(a)
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # 8-byte aligned data, as the reference writer does
    with fs.open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.view(np.uint8).reshape(-1).data if a.size else b"")


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
            tensors.update(load_safetensors(fp))
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
                     tensors: Mapping[str, np.ndarray], *, dtype: str | None = None,
                     max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write config.json + safetensors, as save_pretrained does: float tensors in their own
    dtype (or `dtype`, e.g. "bfloat16"), config.json's "dtype" saying which; shards of at
    most max_shard_bytes with an index file when the tensors are larger."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    if dtype is not None:
        if dtype not in TORCH_NAMES:
            raise ValueError(f"export dtype must be one of {sorted(TORCH_NAMES)}, got {dtype!r}")
        target = np.dtype(getattr(ml_dtypes, dtype, None) or dtype)
        arrays = {k: v.astype(target) if np.issubdtype(v.dtype, np.floating)
                  or v.dtype == ml_dtypes.bfloat16 else v for k, v in arrays.items()}
    floats = sorted({str(v.dtype) for v in arrays.values()
                     if v.dtype.kind == "f" or v.dtype == ml_dtypes.bfloat16})
    config = dict(config)
    if floats:
        config["dtype"] = floats[0] if len(floats) == 1 else "float32"
    fs.makedirs(out_dir)
    fs.write_text(fs.join(out_dir, "config.json"), json.dumps(config, indent=2, sort_keys=True))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(arrays):
        nbytes = arrays[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arrays[name]
        size += nbytes
    index = fs.join(out_dir, INDEX_NAME)
    if len(shards) == 1:
        if fs.exists(index):
            fs.path(index).unlink()
        save_safetensors(shards[0], fs.join(out_dir, WEIGHTS_NAME))
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, fs.join(out_dir, fname))
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(a.nbytes for a in arrays.values())
    fs.write_text(index, json.dumps({"metadata": {"total_size": total},
                                     "weight_map": weight_map}, indent=2, sort_keys=True))
