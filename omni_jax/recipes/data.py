"""A stage's data, resolved against the model: source paths, steps, and media budgets that
cover only the modalities the stage's mixture holds.

Budgets: a tower whose modality no source of the stage carries gets none, so its arrays are
not shipped and its encoder is not run (OmniModel encodes only the media a batch has). A source
declares its modalities (`modalities` in the source config; omni_jax/configs/common.py sets them for
the known source names) or, when it does not, they are read from its records (up to
SCAN_RECORDS of them); with neither (no data yet, nothing declared) every tower gets a budget.
Per modality the budget is batch * the most items one record holds (padding: one record per
row), or batch * (seq_len // tokens per item) with packing; `media_items` overrides both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from omni_jax.omni_config import MODALITIES, OmniConfig
from omni_jax.utils import fs

SCAN_RECORDS = 10_000  # records read per source to find its modalities and items per record
RECORD_KEYS = {"image": ("images", "image"), "video": ("videos", "video"),
               "audio": ("audios", "audio")}


def audio_config(config: ml_collections.ConfigDict) -> Any:
    """The recipe's data.features AudioConfig."""
    from omni_jax.data.features.config import AudioConfig

    return AudioConfig.from_dict(config.audio_features.to_dict())


def _count(value: Any) -> int:
    if value is None:
        return 0
    return len(value) if isinstance(value, list | tuple) else 1


def scan_items(paths: list[str], limit: int = SCAN_RECORDS) -> dict[str, int]:
    """Most items of each modality one record holds, over the first `limit` JSONL records."""
    most = dict.fromkeys(MODALITIES, 0)
    seen = 0
    for path in paths:
        with fs.open(path) as f:
            for line in f:
                if seen >= limit:
                    return most
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # counted as corrupt by the source
                seen += 1
                for m, keys in RECORD_KEYS.items():
                    most[m] = max(most[m], sum(_count(rec.get(k)) for k in keys))
    return most


def stage_items(data: Mapping[str, Any]) -> dict[str, int] | None:
    """Most items per record of each modality over the stage's sources; None if unknown."""
    most = dict.fromkeys(MODALITIES, 0)
    for src in data["sources"].values():
        declared = src.get("modalities")
        paths = [src["path"]] if isinstance(src["path"], str) else list(src["path"])
        if src.get("kind", "jsonl") == "jsonl" and all(fs.isfile(p) for p in paths):
            found = scan_items(paths)
            if declared is not None:
                extra = sorted(m for m in MODALITIES if found[m] and m not in declared)
                if extra:
                    raise ValueError(f"source {paths[0]!r} declares modalities "
                                     f"{list(declared)} but its records hold {extra}")
        elif declared is not None:
            found = {m: int(m in declared) for m in MODALITIES}
        else:
            return None
        most = {m: max(most[m], found[m]) for m in MODALITIES}
    return most


def media_budget(config: ml_collections.ConfigDict, omni: OmniConfig,
                 s: ml_collections.ConfigDict, data: Mapping[str, Any], max_len: int,
                 packing: bool) -> dict[str, Any]:
    """DataConfig.media for a stage (module docstring)."""
    from omni_jax.data.omni import media_spec
    from omni_jax.model import tokens_per_item

    items = dict(s.get("media_items", {}))
    unknown = sorted(set(items) - set(MODALITIES))
    if unknown:
        raise ValueError(f"media_items: unknown modalities {unknown}; expected {MODALITIES}")
    towers = [m for m in MODALITIES if getattr(omni, m) is not None]
    per_record = stage_items(data)
    batch = int(s.batch_size)
    budget = {}
    for m in towers:
        if m in items:
            budget[m] = int(items[m])
        elif per_record is not None and not per_record[m]:
            continue  # the stage's data has none: nothing shipped, the encoder never runs
        elif packing or per_record is None:
            budget[m] = batch * max(1, max_len // tokens_per_item(omni, m))
        else:
            # a tiling image tower: every image is up to max_tiles tiles + its thumbnail
            views = omni.image.max_tiles + 1 if m == "image" and omni.image.max_tiles else 1
            budget[m] = batch * per_record[m] * views
    budget = {m: n for m, n in budget.items() if n > 0}
    spec = media_spec(omni, budget, audio_config(config)) if budget else {}
    # secondary keys (audio_wave, image_lowres) share their modality's budget
    return {k: v for k, v in spec.items() if k.split("_")[0] in budget}


def resolve_data(config: ml_collections.ConfigDict, omni: OmniConfig,
                 s: ml_collections.ConfigDict) -> dict[str, Any]:
    """The stage's DataConfig dict: batch size, source paths under data_root, media budgets."""
    from omni_jax.data.pipeline import DataConfig

    data = s.data.to_dict()
    data["batch_size"] = int(s.batch_size)
    data["sources"] = {k: dict(v) for k, v in data["sources"].items()}
    for src in data["sources"].values():
        paths = [src["path"]] if isinstance(src["path"], str) else list(src["path"])
        paths = [fs.resolve(config.data_root, p) if config.data_root else p for p in paths]
        src["path"] = paths[0] if len(paths) == 1 else tuple(paths)
    if not config.text_only:
        dc = DataConfig.from_dict(data)
        data["media"] = media_budget(config, omni, s, data, dc.max_len, dc.packing)
    head = config.get("xvila_output")
    if head and not config.text_only and "diffusion" in dict(s.losses):
        # a stage training the image decoder: every batch carries (possibly empty) targets
        dec = head.decoder
        data["gen_image"] = {"shape": [int(dec.image_size), int(dec.image_size),
                                       int(dec.channels)]}
    return data


def stage_steps(name: str, s: ml_collections.ConfigDict, data: Mapping[str, Any],
                count_records: Callable[[Mapping[str, Any]], int] | None) -> int | None:
    """steps, or ceil(epochs * records / batch_size) (None if the data is not there)."""
    if s.steps is not None:
        if s.steps <= 0:
            raise ValueError(f"stage {name!r}: steps must be positive, got {s.steps}")
        return int(s.steps)
    if s.epochs is None or s.epochs <= 0:
        raise ValueError(f"stage {name!r}: set steps or a positive epochs, got {s.steps}, "
                         f"{s.epochs}")
    if count_records is None:
        return None
    return max(1, math.ceil(s.epochs * count_records(data) / data["batch_size"]))


def count_records(data: Mapping[str, Any]) -> int:
    """Records over the stage's sources."""
    from omni_jax.data.pipeline import DataConfig, build_sources

    return sum(len(src) for src in build_sources(DataConfig.from_dict(data)).values())
