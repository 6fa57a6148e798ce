"""omni_digits: an offline omni-modal TFDS dataset (sklearn digits + espeak-ng speech).

    from omni_jax.data.omni_digits import prepare, write_manifests
    builder = prepare("small", data_dir)                 # array_record, no TensorFlow
    paths = write_manifests(builder, out_dir, "train")   # JSONL manifests + media files
CLI: python -m omni_jax.data.omni_digits.export --out DIR --config small|ci|full [--data_dir D]

Modules: voices (espeak-ng voices, splits, styles, renderer), tasks (record generators),
builder (the TFDS builder), export (manifests). Names resolve lazily (tfds imports on use).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"OmniDigits": "builder", "OmniDigitsConfig": "builder", "prepare": "builder",
         "make_builder": "builder", "units_dir": "builder", "CONFIG_NAMES": "builder",
         "write_manifests": "export", "open_builder": "export", "TASKS": "tasks",
         "VOICES": "voices"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
