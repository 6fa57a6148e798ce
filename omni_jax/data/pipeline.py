"""grain input pipeline: weighted source mixture -> shard -> encode -> filter -> pad/pack -> batch.

    each source (JSONL / TFDS) --shuffle(seed), repeat(num_epochs),
      [process_index::process_count]--> mix(weights) --> map(encode_fn, shift) --> IterDataset
      --> drop over-long (counted) --> bucketed padding or first-fit packing --> batches

Batches are dicts of int32 numpy arrays [batch_size // process_count, seq] (see
`omni_jax.data.packing`). The iterator is a grain DatasetIterator: `get_state()` /
`set_state()` resume exactly (counters included), and `.metrics()` reports counts.

Mixing is grain's deterministic proportional interleave; every source is shuffled with its
own seed and reshuffled each epoch. With num_epochs=None the stream is infinite; with an
integer, the mixture ends when the first source runs out at its proportion (grain semantics).
Sharding slices every source's shuffled stream before mixing, so processes see disjoint
records and each one mixes with the configured weights. Bucketed padding
picks a shape per batch from the local examples, so with several processes it needs packing
or a single bucket (all processes must feed the same shape): that is checked.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from omni_jax.config_base import StrictConfig
from omni_jax.data import packing
from omni_jax.data.gen_image import check_gen_spec, gen_seeds
from omni_jax.data.sources import ON_CORRUPT, CorruptMediaError, JsonlSource, TfdsSource
from omni_jax.data.speech import check_speech_spec, fits

log = logging.getLogger(__name__)
SOURCE_KINDS = ("jsonl", "tfds")
EncodeFn = Callable[[dict[str, Any]], Mapping[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class SourceConfig(StrictConfig):
    """One mixture component: where records come from and its sampling weight."""

    kind: str = "jsonl"  # "jsonl" (path: manifest file(s)) | "tfds" (path: dataset dir)
    path: str | tuple[str, ...] = ""
    weight: float = 1.0
    split: str = "train"  # tfds only
    required_fields: tuple[str, ...] = ("messages",)  # jsonl only
    on_corrupt: str = "skip"  # jsonl only: "skip" (warn + count) | "raise"
    # media its records hold (image / video / audio; () = text only); None = read from records
    modalities: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"SourceConfig.kind must be one of {SOURCE_KINDS}, got {self.kind!r}")
        if not self.weight > 0:
            raise ValueError(f"SourceConfig.weight must be positive, got {self.weight!r}")
        if self.on_corrupt not in ON_CORRUPT:
            raise ValueError(f"SourceConfig.on_corrupt must be one of {ON_CORRUPT}, "
                             f"got {self.on_corrupt!r}")
        if not isinstance(self.path, str):
            object.__setattr__(self, "path", tuple(self.path))
        object.__setattr__(self, "required_fields", tuple(self.required_fields))
        if self.modalities is not None:
            object.__setattr__(self, "modalities", tuple(self.modalities))
            bad = sorted(set(self.modalities) - {"image", "video", "audio"})
            if bad:
                raise ValueError(f"SourceConfig.modalities: unknown {bad}; expected a subset "
                                 f"of ['audio', 'image', 'video']")

    def build(self) -> JsonlSource | TfdsSource:
        if not self.path:
            raise ValueError(f"SourceConfig: a {self.kind} source needs a path")
        if self.kind == "tfds":
            return TfdsSource(self.path, self.split)
        return JsonlSource(self.path, required_fields=self.required_fields,
                           on_corrupt=self.on_corrupt)


@dataclasses.dataclass(frozen=True)
class DataConfig(StrictConfig):
    """Pipeline hyper-parameters (one per training stage)."""

    sources: Mapping[str, SourceConfig] = dataclasses.field(default_factory=dict)
    seed: int = 0
    batch_size: int = 8  # global, split evenly over processes
    seq_buckets: tuple[int, ...] = (128, 256, 512)  # padding mode: allowed seq lengths
    packing: bool = False
    seq_len: int | None = None  # packing mode: row length (default max(seq_buckets))
    num_epochs: int | None = None  # None: repeat forever
    pad_id: int = 0
    pad_values: Mapping[str, int] = dataclasses.field(  # padding of extra per-token keys
        default_factory=lambda: {"item_index": -1})
    drop_remainder: bool = False  # drop a final partial batch (else pad it to full shape)
    # media arrays per batch: {"image": {"max_items": 8, "shape": [H, W, 3]}, ...} (omni data;
    # optional "tokens": embeddings per item, for items with fewer placeholders: packing)
    media: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # speech-out targets (data.speech): {"text_len": S, "units_len": U} static padded lengths
    speech: Mapping[str, int] = dataclasses.field(default_factory=dict)
    # image-out targets (data.gen_image): {"shape": [S, S, C]}, the image decoder's images
    gen_image: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # records whose media cannot be decoded: "skip" (warn + count) | "raise"; skipping stops
    # with a ValueError once more than skip_grace records and max_skipped_fraction are bad
    on_corrupt_media: str = "skip"
    max_skipped_fraction: float = 0.1
    skip_grace: int = 10
    read_threads: int = 2  # grain threads running encode_fn
    prefetch_buffer: int = 16

    def __post_init__(self) -> None:
        srcs = {str(k): v if isinstance(v, SourceConfig) else SourceConfig.from_dict(v)
                for k, v in dict(self.sources).items()}
        object.__setattr__(self, "sources", srcs)
        object.__setattr__(self, "seq_buckets", tuple(int(b) for b in self.seq_buckets))
        object.__setattr__(self, "pad_values", {str(k): int(v)
                                                for k, v in dict(self.pad_values).items()})
        spec = {}
        for key, v in dict(self.media).items():
            v = dict(v)
            if key not in packing.MEDIA_KEYS or sorted(set(v) - {"tokens"}) != [
                    "max_items", "shape"] or int(v["max_items"]) <= 0 or (
                    "tokens" in v and (key not in packing.MEDIA_CODES or int(v["tokens"]) <= 0)):
                raise ValueError(f"DataConfig.media[{key!r}] must be {{max_items: > 0, shape: "
                                 f"[...](, tokens: > 0 for {tuple(packing.MEDIA_CODES)})}} with "
                                 f"key in {packing.MEDIA_KEYS}, got {v}")
            spec[key] = (int(v["max_items"]), tuple(int(s) for s in v["shape"]),
                         *([int(v["tokens"])] if "tokens" in v else []))
        object.__setattr__(self, "media", spec)
        object.__setattr__(self, "speech", check_speech_spec(self.speech))
        object.__setattr__(self, "gen_image", check_gen_spec(self.gen_image))
        if (self.speech or self.gen_image) and self.packing:
            raise ValueError("DataConfig: speech-out and image-out targets need packing=False "
                             "(one conversation per row)")
        b = self.seq_buckets
        if not b or any(x <= 0 for x in b) or list(b) != sorted(set(b)):
            raise ValueError(f"DataConfig.seq_buckets must be positive and strictly "
                             f"ascending, got {b}")
        if self.batch_size <= 0:
            raise ValueError(f"DataConfig.batch_size must be positive, got {self.batch_size}")
        if self.seq_len is not None and self.seq_len <= 0:
            raise ValueError(f"DataConfig.seq_len must be positive, got {self.seq_len}")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise ValueError(f"DataConfig.num_epochs must be positive or None, "
                             f"got {self.num_epochs}")
        if self.on_corrupt_media not in ON_CORRUPT:
            raise ValueError(f"DataConfig.on_corrupt_media must be one of {ON_CORRUPT}, got "
                             f"{self.on_corrupt_media!r}")
        if not 0 <= self.max_skipped_fraction <= 1 or self.skip_grace < 0:
            raise ValueError(f"DataConfig.max_skipped_fraction must be in [0, 1] and skip_grace "
                             f">= 0, got {self.max_skipped_fraction}, {self.skip_grace}")
        if self.read_threads < 0 or self.prefetch_buffer < 0:
            raise ValueError("DataConfig.read_threads and prefetch_buffer must be >= 0")

    @property
    def max_len(self) -> int:
        """Longest training example kept (longer ones are dropped and counted)."""
        if self.packing:
            return self.seq_len or self.seq_buckets[-1]
        return self.seq_buckets[-1]


def default_config() -> ml_collections.ConfigDict:
    """ConfigDict form of DataConfig for recipes: set `sources.<name> = {kind, path, weight}`."""
    c = ml_collections.ConfigDict(dataclasses.asdict(DataConfig()))
    c.sources = ml_collections.ConfigDict()
    c.seq_len = ml_collections.FieldReference(None, field_type=int)
    c.num_epochs = ml_collections.FieldReference(None, field_type=int)
    return c


def build_sources(config: DataConfig) -> dict[str, JsonlSource | TfdsSource]:
    return {name: s.build() for name, s in config.sources.items()}


# -- grain stages (module-level callables so pipelines pickle for worker processes) ----------
def _tag(index: int, record: Any) -> tuple[int, Any]:
    return index, record


def _encode(encode_fn: EncodeFn, skip_corrupt: bool, item: tuple[int, Any]
            ) -> tuple[int, dict[str, np.ndarray] | str]:
    """(source, record) -> (source, training example), or (source, error message) for a record
    with undecodable media when skipping."""
    index, record = item
    try:
        return index, packing.shift_example(encode_fn(record))
    except CorruptMediaError as e:
        if not skip_corrupt:
            raise
        return index, str(e)


_COUNTERS = ("batches", "examples", "dropped_too_long", "tokens", "token_slots", "pulled",
             "skipped_corrupt_media")


TOO_LONG_GRACE = 256  # examples dropped as too long, none kept: a config error, not bad luck


class _BatchIterator(grain.DatasetIterator):
    """Drops over-long examples, pads or packs the rest into batches; checkpointable."""

    def __init__(self, parent: grain.DatasetIterator, ds: BatchDataset) -> None:
        super().__init__(parent)
        self._ds = ds
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._per_source = [0] * len(ds.source_names)
        self._pending = None  # (parent state before it, source index, example)

    def _pull(self):
        while True:
            state = self._parent.get_state() if self._ds.packing else None
            index, ex = next(self._parent)
            self._counts["pulled"] += 1
            if isinstance(ex, str):  # undecodable media: skipped and counted
                self._skip(ex)
                continue
            if packing.example_length(ex) > self._ds.max_len or not fits(ex, self._ds.speech):
                self._counts["dropped_too_long"] += 1
                c = self._counts
                if c["dropped_too_long"] >= TOO_LONG_GRACE and c["examples"] == 0:
                    raise ValueError(f"the first {c['dropped_too_long']} examples are all longer "
                                     f"than seq_len={self._ds.max_len} tokens (the latest: "
                                     f"{packing.example_length(ex)}) or than the speech target "
                                     f"lengths; raise data.seq_len / data.speech")
                continue
            return state, index, ex

    def _skip(self, why: str) -> None:
        c, ds = self._counts, self._ds
        c["skipped_corrupt_media"] += 1
        log.warning("skipping a record: %s", why)
        bad = c["skipped_corrupt_media"]
        if bad > ds.skip_grace and bad > ds.max_skipped_fraction * c["pulled"]:
            raise ValueError(f"{bad} of {c['pulled']} records had undecodable media (more than "
                             f"max_skipped_fraction={ds.max_skipped_fraction:g}); last: {why}")

    def _take(self, index: int, ex: Mapping[str, np.ndarray]) -> None:
        self._counts["examples"] += 1
        self._counts["tokens"] += packing.example_length(ex)
        self._per_source[index] += 1

    def __next__(self) -> dict[str, np.ndarray]:
        ds = self._ds
        if ds.packing:
            packer = packing.FirstFitPacker(ds.local_batch, ds.max_len, ds.pad_id,
                                            ds.pad_values, ds.media, ds.process_index)
            if self._pending is not None:
                _, index, ex = self._pending
                self._pending = None
                packer.add(ex)
                self._take(index, ex)
            while True:
                try:
                    state, index, ex = self._pull()
                except StopIteration:
                    if packer.empty or ds.drop_remainder:
                        raise
                    break
                if not packer.add(ex):
                    self._pending = (state, index, ex)
                    break
                self._take(index, ex)
            batch = packer.emit()
        else:
            examples = []
            while len(examples) < ds.local_batch:
                try:
                    _, index, ex = self._pull()
                except StopIteration:
                    if not examples or ds.drop_remainder:
                        raise
                    break
                examples.append(ex)
                self._take(index, ex)
            batch = packing.pad_batch(examples, ds.local_batch, ds.seq_buckets, ds.pad_id,
                                      ds.pad_values, ds.media, ds.process_index, ds.speech,
                                      ds.gen_image)
            if ds.gen_image:
                batch["gen_seed"] = gen_seeds(self._counts["batches"], ds.batch_size,
                                              ds.process_index, ds.local_batch)
        self._counts["batches"] += 1
        self._counts["token_slots"] += batch["input_ids"].size
        return batch

    def get_state(self) -> dict[str, Any]:
        parent = self._pending[0] if self._pending is not None else self._parent.get_state()
        return {"parent": parent, "counts": dict(self._counts),
                "per_source": list(self._per_source)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._counts = {**dict.fromkeys(_COUNTERS, 0), **dict(state["counts"])}
        self._per_source = list(state["per_source"])
        self._pending = None

    def metrics(self) -> dict[str, float]:
        """Counters since the start of the stream ('data/...'), for logging."""
        c = self._counts
        out = {f"data/{k}": c[k] for k in ("batches", "examples", "dropped_too_long",
                                            "skipped_corrupt_media")}
        out["data/token_fraction"] = c["tokens"] / max(c["token_slots"], 1)
        corrupt = 0
        for name, n, src in zip(self._ds.source_names, self._per_source, self._ds.sources):
            out[f"data/examples/{name}"] = n
            bad = getattr(src, "num_corrupt", 0)
            out[f"data/corrupt_records/{name}"] = bad
            corrupt += bad
        out["data/corrupt_records"] = corrupt
        return out

    def __str__(self) -> str:
        return f"BatchIterator(packing={self._ds.packing}, batch={self._ds.local_batch})"


class BatchDataset(grain.IterDataset):
    """IterDataset of encoded (source index, example) -> static-shape batches."""

    def __init__(self, parent: grain.IterDataset, config: DataConfig, local_batch: int,
                 source_names: Sequence[str], sources: Sequence[Any],
                 process_index: int = 0) -> None:
        super().__init__(parent)
        self.packing, self.max_len = config.packing, config.max_len
        self.seq_buckets, self.pad_id = config.seq_buckets, config.pad_id
        self.pad_values, self.media = config.pad_values, config.media
        self.speech, self.gen_image = config.speech, config.gen_image
        self.batch_size = config.batch_size
        self.skip_grace, self.max_skipped_fraction = config.skip_grace, config.max_skipped_fraction
        # media rows of this process start after the lower processes' (global arrays are the
        # local ones concatenated in process order): media_index is offset accordingly
        self.process_index = process_index
        self.drop_remainder, self.local_batch = config.drop_remainder, local_batch
        self.source_names, self.sources = tuple(source_names), tuple(sources)

    def __iter__(self) -> _BatchIterator:
        return _BatchIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"BatchDataset(packing={self.packing}, batch={self.local_batch})"


def _process() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


def make_dataset(config: DataConfig | Mapping[str, Any], encode_fn: EncodeFn, *,
                 sources: Mapping[str, Any] | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> BatchDataset:
    """Build the pipeline; `iter()` of the result is the checkpointable batch iterator.

    sources: already-built random-access sources by name (default: built from config.sources;
    names must match config.sources, which always supply the weights).
    process_index / process_count default to jax.process_index() / jax.process_count().
    """
    if not isinstance(config, DataConfig):
        config = DataConfig.from_dict(config)
    if not config.sources:
        raise ValueError("make_dataset: config.sources is empty; expected at least one source")
    if sources is None:
        sources = build_sources(config)
    elif sorted(sources) != sorted(config.sources):
        raise ValueError(f"make_dataset: sources {sorted(sources)} do not match "
                         f"config.sources {sorted(config.sources)}")
    if process_index is None or process_count is None:
        process_index, process_count = _process()
    if not 0 <= process_index < process_count:
        raise ValueError(f"make_dataset: process_index {process_index} not in "
                         f"[0, {process_count})")
    if config.batch_size % process_count:
        raise ValueError(f"make_dataset: batch_size {config.batch_size} is not divisible by "
                         f"process_count {process_count}")
    if process_count > 1 and not config.packing and len(config.seq_buckets) > 1:
        raise ValueError(f"make_dataset: {len(config.seq_buckets)} seq_buckets with "
                         f"{process_count} processes could give processes different shapes; "
                         f"use packing=True or a single bucket")
    names = list(config.sources)
    parts = []
    for i, name in enumerate(names):
        if len(sources[name]) == 0:
            raise ValueError(f"make_dataset: source {name!r} has no records")
        ds = grain.MapDataset.source(sources[name]).map(functools.partial(_tag, i))
        ds = ds.shuffle(seed=config.seed * 1_000_003 + i).repeat(config.num_epochs)
        parts.append(ds[process_index::process_count])
    weights = [config.sources[n].weight for n in names]
    mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    encoded = mixed.map(functools.partial(_encode, encode_fn,
                                          config.on_corrupt_media == "skip"))
    it = encoded.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                                   prefetch_buffer_size=config.prefetch_buffer))
    return BatchDataset(it, config, config.batch_size // process_count, names,
                        [sources[n] for n in names], process_index)
