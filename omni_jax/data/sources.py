"""Random-access record sources for grain: JSONL manifests and TFDS array_record datasets.

A record is a JSON-like dict (e.g. {"messages": [...], "images": ["img/0.png"]}). Values of the
media keys (`MEDIA_KEYS`: a path string or a possibly nested list of them) are media references:
JSONL sources resolve them to absolute paths (against the manifest's directory); TFDS sources
return the media bytes themselves. `read_media(ref)` turns either form into bytes.

Corrupt JSONL records (bad JSON, not an object, a missing required field, a missing media file)
are found once, while indexing: with on_corrupt="skip" (default) each is skipped with a warning
and counted (`num_corrupt`, `corrupt_examples`, surfaced by the pipeline's metrics); with
on_corrupt="raise" the first one raises ValueError naming file and line.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from omni_jax.utils import fs

MEDIA_KEYS = ("image", "images", "audio", "audios", "video", "videos", "gen_image")
ON_CORRUPT = ("skip", "raise")


class CorruptMediaError(ValueError):
    """A record's media item could not be read or decoded (the pipeline skips the record unless
    DataConfig.on_corrupt_media="raise")."""
_MAX_KEPT_EXAMPLES = 20  # corrupt-line descriptions kept for reports (all are counted)

log = logging.getLogger(__name__)

MediaRef = str | bytes


def read_media(ref: MediaRef) -> bytes:
    """A media reference from a record (absolute path or inline bytes) -> the file's bytes."""
    if isinstance(ref, bytes | bytearray | np.bytes_):
        return bytes(ref)
    if isinstance(ref, str):
        return fs.read_bytes(ref)
    raise ValueError(f"read_media: expected a path string or bytes, got {type(ref).__name__}")


def _map_refs(value: Any, fn) -> Any:
    """Apply fn to every leaf of a media value (a reference or nested lists of them)."""
    if isinstance(value, list | tuple):
        return [_map_refs(v, fn) for v in value]
    return fn(value)


def _as_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    out = [os.fspath(p) for p in paths]
    if not out:
        raise ValueError("JsonlSource: expected at least one JSONL path, got none")
    for p in out:
        if not fs.isfile(p):
            raise ValueError(f"JsonlSource: manifest {p!r} does not exist or is not a file")
    return out


class JsonlSource:
    """grain RandomAccessDataSource over JSONL manifests (one JSON object per line).

    Line offsets are indexed once at construction; __getitem__ reads one line with pread
    (thread-safe, no shared file position). Blank lines are ignored. Corrupt lines are skipped
    with a warning and counted (on_corrupt="skip") or raise ValueError (on_corrupt="raise").
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                 required_fields: Sequence[str] = ("messages",),
                 media_keys: Sequence[str] = MEDIA_KEYS, on_corrupt: str = "skip",
                 check_media: bool = True, inline_media: bool = False) -> None:
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"JsonlSource: on_corrupt must be one of {ON_CORRUPT}, "
                             f"got {on_corrupt!r}")
        self._paths = _as_paths(paths)
        self._dirs = [fs.dirname(fs.abspath(p)) for p in self._paths]
        self.required_fields = tuple(required_fields)
        self.media_keys = tuple(media_keys)
        self.on_corrupt = on_corrupt
        self.check_media = check_media
        self.inline_media = inline_media
        self.num_corrupt = 0
        self.corrupt_examples: list[str] = []
        files, offsets, lengths = [], [], []
        for fi, path in enumerate(self._paths):
            off = 0
            with fs.open(path, "rb") as f:
                for lineno, line in enumerate(f, start=1):
                    if line.strip():
                        problem = self._check_line(line, fi)
                        if problem is None:
                            files.append(fi)
                            offsets.append(off)
                            lengths.append(len(line))
                        else:
                            self._corrupt(f"{path}:{lineno}: {problem}")
                    off += len(line)
        self._file = np.asarray(files, np.int32)
        self._offset = np.asarray(offsets, np.int64)
        self._length = np.asarray(lengths, np.int64)
        self._fds: dict[int, int] = {}

    # -- indexing ---------------------------------------------------------------------------
    def _check_line(self, line: bytes, fi: int) -> str | None:
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return f"bad JSON ({e.msg if hasattr(e, 'msg') else e})"
        if not isinstance(rec, dict):
            return f"expected a JSON object, got {type(rec).__name__}"
        missing = [k for k in self.required_fields if k not in rec]
        if missing:
            return f"missing required field(s) {missing}"
        for key in self.media_keys:
            if key not in rec:
                continue
            leaves: list[Any] = []
            _map_refs(rec[key], leaves.append)
            for ref in leaves:
                if not isinstance(ref, str):
                    return f"{key}: expected a path string, got {type(ref).__name__}"
                if self.check_media and not fs.isfile(self._resolve(ref, fi)):
                    return f"{key}: missing media file {ref!r}"
        return None

    def _corrupt(self, what: str) -> None:
        if self.on_corrupt == "raise":
            raise ValueError(f"JsonlSource: corrupt record at {what}")
        self.num_corrupt += 1
        if len(self.corrupt_examples) < _MAX_KEPT_EXAMPLES:
            self.corrupt_examples.append(what)
        log.warning("JsonlSource: skipping corrupt record at %s", what)

    def _resolve(self, ref: str, fi: int) -> str:
        return fs.resolve(self._dirs[fi], ref)

    # -- RandomAccessDataSource protocol ----------------------------------------------------
    def __len__(self) -> int:
        return len(self._offset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"JsonlSource: index {index} out of range for {n} records")
        index %= n
        fi = int(self._file[index])
        offset, length = int(self._offset[index]), int(self._length[index])
        if fs.is_url(self._paths[fi]):  # object stores: a ranged read per record
            with fs.open(self._paths[fi], "rb") as f:
                f.seek(offset)
                line = f.read(length)
        else:
            fd = self._fds.get(fi)
            if fd is None:
                fd = self._fds[fi] = os.open(self._paths[fi], os.O_RDONLY)
            line = os.pread(fd, length, offset)
        rec = json.loads(line)
        for key in self.media_keys:
            if key in rec:
                fn = lambda r, fi=fi: self._resolve(r, fi)
                if self.inline_media:
                    fn = lambda r, fi=fi: read_media(self._resolve(r, fi))
                rec[key] = _map_refs(rec[key], fn)
        return rec

    def __getstate__(self) -> dict[str, Any]:  # picklable for grain worker processes
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"JsonlSource(paths={self._paths}, len={len(self)}, corrupt={self.num_corrupt})"

    def metrics(self) -> dict[str, int]:
        return {"records": len(self), "corrupt_records": self.num_corrupt}


# -- TFDS (array_record, no TensorFlow) -------------------------------------------------------
# A record is stored as its JSON text with media leaves replaced by indices into a "media"
# sequence of bytes; `_media_keys` lists which keys hold media. tensorflow_datasets 4.9.10
# writes and reads this with array_record and its numpy example codec: TensorFlow is not needed.

def _builder_cls():
    import tensorflow_datasets as tfds  # deferred: ~0.6 s import

    class JsonlRecords(tfds.core.GeneratorBasedBuilder):
        """Array_record TFDS dataset of JSON records with their media bytes inline."""

        VERSION = tfds.core.Version("1.0.0")

        def __init__(self, *, splits: Mapping[str, Iterable[dict[str, Any]]] | None = None,
                     media_keys: Sequence[str] = MEDIA_KEYS, **kwargs: Any) -> None:
            self._splits = splits
            self._media_keys = tuple(media_keys)
            super().__init__(**kwargs)

        def _info(self):
            feats = tfds.features.FeaturesDict({
                "record": tfds.features.Text(),
                "media": tfds.features.Sequence(
                    tfds.features.Tensor(shape=(), dtype=np.object_)),
            })
            return tfds.core.DatasetInfo(builder=self, features=feats)

        def _split_generators(self, dl_manager):
            del dl_manager
            if self._splits is None:
                raise ValueError("JsonlRecords: no records given to prepare")
            return {name: self._generate_examples(recs) for name, recs in self._splits.items()}

        def _generate_examples(self, records):
            for i, rec in enumerate(records):
                blobs: list[bytes] = []

                def take(ref, blobs=blobs):
                    blobs.append(read_media(ref))
                    return len(blobs) - 1

                rec = dict(rec)
                keys = [k for k in self._media_keys if k in rec]
                for k in keys:
                    rec[k] = _map_refs(rec[k], take)
                rec["_media_keys"] = keys
                yield i, {"record": json.dumps(rec), "media": blobs}

    return JsonlRecords


def write_tfds(splits: Mapping[str, Iterable[dict[str, Any]]], data_dir: str | os.PathLike, *,
               media_keys: Sequence[str] = MEDIA_KEYS) -> str:
    """Write records (e.g. a JsonlSource per split) as an array_record TFDS dataset.

    Media references in the records are read (`read_media`) and stored inline. Returns the
    dataset directory (data_dir/jsonl_records/1.0.0) to pass to `TfdsSource`. Note TFDS
    shuffles records at write time (by key hash), so read order differs from write order.
    """
    if not splits:
        raise ValueError("write_tfds: expected at least one split of records, got none")
    builder = _builder_cls()(splits=splits, media_keys=media_keys, data_dir=os.fspath(data_dir),
                             file_format="array_record")
    builder.download_and_prepare()
    return os.fspath(builder.data_dir)


class TfdsSource:
    """grain RandomAccessDataSource over a TFDS array_record split (read without TensorFlow).

    Works on datasets written by `write_tfds` (records come back as dicts with media bytes
    inline) and on any other array_record TFDS dataset directory (its decoded feature dicts
    come back unchanged).
    """

    def __init__(self, dataset_dir: str | os.PathLike, split: str = "train") -> None:
        import tensorflow_datasets as tfds

        dataset_dir = os.fspath(dataset_dir)
        if not os.path.isfile(os.path.join(dataset_dir, "dataset_info.json")):
            raise ValueError(f"TfdsSource: {dataset_dir!r} is not a prepared TFDS dataset "
                             f"directory (no dataset_info.json)")
        builder = tfds.builder_from_directory(dataset_dir)
        if split not in builder.info.splits:
            raise ValueError(f"TfdsSource: split {split!r} not in {dataset_dir!r}; available: "
                             f"{sorted(builder.info.splits)}")
        self._source = builder.as_data_source(split=split)
        self.dataset_dir, self.split = dataset_dir, split

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _decode(self._source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [_decode(x) for x in self._source.__getitems__(list(indices))]

    def __repr__(self) -> str:
        return f"TfdsSource({self.dataset_dir!r}, split={self.split!r}, len={len(self)})"

    def metrics(self) -> dict[str, int]:
        return {"records": len(self), "corrupt_records": 0}


def _decode(example: dict[str, Any]) -> dict[str, Any]:
    if set(example) != {"record", "media"}:
        return example
    text = example["record"]
    rec = json.loads(text.decode() if isinstance(text, bytes) else text)
    media = list(example["media"])
    for k in rec.pop("_media_keys", []):
        rec[k] = _map_refs(rec[k], lambda i: bytes(media[i]))
    return rec
