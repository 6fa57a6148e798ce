"""Examples -> static-shape batches: next-token shifting, bucketed padding, first-fit packing.

An *encoded* example (the output of an `encode_fn`) is a dict of 1-D integer arrays of one
length n: "input_ids", "loss_mask" (1 where that token is a label to predict, e.g. assistant
tokens) and optional extra per-token arrays (e.g. modality / item ids). `shift_example` turns it
into a *training* example of length n-1: input_ids = ids[:-1], targets = ids[1:],
loss_mask = loss_mask[1:], extras = extras[:-1]. Targets are made per example, so no target
ever crosses an example boundary, whatever is packed next to it.

A *batch* is a dict of int32 arrays [batch, seq]: input_ids, targets, loss_mask, segment_ids
(0 = padding, 1..k = the k examples of a row, in order), positions (0.. per example, 0 on
padding), plus the extra per-token keys. Padding is pad_id in input_ids, pad_values[key] for
keys named there (e.g. {"item_index": -1}) and 0 elsewhere.

Media: an example may also carry per-item float arrays under MEDIA_KEYS (image [n, H, W, 3],
video [n, F, H, W, 3], audio [n, mels, frames] or chunked [n, chunks, mels, frames], audio_wave
[n, chunks, samples] for a BEATs audio tower, image_lowres [n, h, w, 3] for Ola's two image
views); they pass through shifting untouched, and a batch stacks them in layout order
(row-major, left to right: the order in which the model fills placeholders), zero-padded to a
static `media` spec {key: (max_items, item_shape[, tokens per item])}.
With a media spec and per-token "modality"/"item_index" arrays, the batch also gets
"media_index" [batch, seq]: for each placeholder token, its row in that modality's flattened
[items * tokens_per_item] embeddings, offset by process_index * max_items items (on multi-host
the global media arrays are the processes' local ones concatenated in process order); -1 on
text and padding. An item may bring fewer placeholders than tokens_per_item (a short clip
of a short_clips="drop" video tower): with the spec's tokens per item, its k-th placeholder
takes row (item * tokens + k), the rest of the item's rows unused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from omni_jax.data.gen_image import GEN_KEYS, collate_gen
from omni_jax.data.speech import SPEECH_KEYS, collate_speech

REQUIRED_KEYS = ("input_ids", "loss_mask")
MEDIA_KEYS = ("image", "video", "audio", "audio_wave", "image_lowres")
MEDIA_CODES = {"image": 1, "video": 2, "audio": 3}  # data.template's per-token modality ids
# key -> (max_items, item shape) or (max_items, item shape, tokens per item)
MediaSpec = Mapping[str, tuple[Any, ...]]
BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


def shift_example(example: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Encoded example [n] -> training example [n-1] with targets (see module docstring)."""
    missing = [k for k in REQUIRED_KEYS if k not in example]
    if missing:
        raise ValueError(f"shift_example: encode_fn output lacks {missing}; got keys "
                         f"{sorted(example)}")
    media = {k: np.asarray(v, np.float32) for k, v in example.items() if k in MEDIA_KEYS}
    speech = {k: np.asarray(v, np.int32) for k, v in example.items() if k in SPEECH_KEYS}
    gen = {k: np.asarray(v) for k, v in example.items() if k in GEN_KEYS}
    arrays = {k: np.asarray(v) for k, v in example.items()
              if k not in MEDIA_KEYS and k not in SPEECH_KEYS and k not in GEN_KEYS}
    n = arrays["input_ids"].shape
    for k, v in arrays.items():
        integral = np.issubdtype(v.dtype, np.integer) or v.dtype == np.bool_
        if v.ndim != 1 or v.shape != n or not integral:
            raise ValueError(f"shift_example: {k!r} must be a 1-D integer array of the same "
                             f"length as input_ids {n}, got shape {v.shape} dtype {v.dtype}")
    if n[0] < 2:
        raise ValueError(f"shift_example: an example needs at least 2 tokens, got {n[0]}")
    ids = arrays.pop("input_ids").astype(np.int32)
    mask = arrays.pop("loss_mask").astype(np.int32)
    out = {"input_ids": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:]}
    out.update({k: v[:-1].astype(np.int32) for k, v in arrays.items()})
    out.update(media)
    out.update(speech)  # per-example (not per-token) arrays: unshifted
    out.update(gen)
    return out


def example_length(example: Mapping[str, np.ndarray]) -> int:
    return int(example["input_ids"].shape[0])


def _empty_batch(keys: Sequence[str], batch_size: int, seq_len: int, pad_id: int,
                 pad_values: Mapping[str, int] | None):
    fill = {**(pad_values or {}), "input_ids": pad_id}
    return {k: np.full((batch_size, seq_len), fill.get(k, 0), np.int32) for k in keys}


def _token_keys(example: Mapping[str, np.ndarray]) -> list[str]:
    return [k for k in example
            if k not in MEDIA_KEYS and k not in SPEECH_KEYS and k not in GEN_KEYS]


def _batch_keys(examples: Sequence[Mapping[str, np.ndarray]]) -> list[str]:
    keys = _token_keys(examples[0]) if examples else ["input_ids", "targets", "loss_mask"]
    for ex in examples[1:]:
        if sorted(_token_keys(ex)) != sorted(keys):
            raise ValueError(f"examples disagree on keys: {sorted(keys)} vs "
                             f"{sorted(_token_keys(ex))}")
    return keys + ["segment_ids", "positions"]


def media_index(example: Mapping[str, np.ndarray], first_item: Mapping[str, int],
                tokens: Mapping[str, int] | None = None) -> np.ndarray:
    """[n] flat embedding row of each placeholder token (see module docstring), -1 elsewhere.

    first_item: the batch-wide item row where this example's first item of each modality sits;
    tokens: embeddings per item of a modality (None / absent: every item has the same count).
    """
    out = np.full(example["input_ids"].shape, -1, np.int32)
    modality, item = example["modality"], example["item_index"]
    for key, code in MEDIA_CODES.items():
        is_m = modality == code
        if not is_m.any():
            continue
        items = item[is_m]  # items are numbered in order of appearance, contiguous runs
        per = np.bincount(items)  # placeholders per item
        full = (tokens or {}).get(key)
        if full is None and (per != per[0]).any():
            raise ValueError(f"{key} items have different token counts {per.tolist()}")
        if full is not None and per.max() > full:
            raise ValueError(f"a {key} item has {per.max()} placeholders but an item gives "
                             f"{full} embeddings")
        full = int(per[0] if full is None else full)
        # the k-th placeholder of an item takes row (item * full + k) of the batch's items
        starts = np.concatenate([[0], np.cumsum(per)[:-1]])
        rank = np.arange(items.size) - starts[items]
        out[is_m] = (first_item.get(key, 0) + items) * full + rank
    return out


def _add_media(out: dict[str, np.ndarray], placed: Sequence[tuple[int, int, Mapping]],
               media: MediaSpec | None, process_index: int) -> None:
    """Stack media of the examples `placed` [(row, start, example)] in layout order into `out`,
    and fill out["media_index"] when the examples carry modality/item_index."""
    examples = [ex for _, _, ex in placed]
    out.update(collate_media(examples, media))
    if not media or not examples or "item_index" not in examples[0]:
        return
    first = {key: process_index * media[key][0] for key in MEDIA_CODES if key in media}
    tokens = {key: media[key][2] for key in first if len(media[key]) > 2}
    out["media_index"] = place_media_index(out["input_ids"].shape, placed, first, tokens)


def place_media_index(shape: tuple[int, int], placed: Sequence[tuple[int, int, Mapping]],
                      first_item: Mapping[str, int], tokens: Mapping[str, int] | None = None
                      ) -> np.ndarray:
    """[rows, width] media_index of examples `placed` [(row, start, example)] in layout order
    (their media stacked in that order from row first_item[key] of each modality), -1 elsewhere."""
    index = np.full(shape, -1, np.int32)
    first = {key: int(first_item.get(key, 0)) for key in MEDIA_CODES}
    for r, start, ex in placed:
        index[r, start:start + example_length(ex)] = media_index(ex, first, tokens)
        for key in first:
            first[key] += len(ex[key]) if key in ex else 0
    return index


def collate_media(examples: Sequence[Mapping[str, np.ndarray]],
                  media: MediaSpec | None) -> dict[str, np.ndarray]:
    """Media of examples in layout order -> {key: [max_items, *shape]} float32, zero-padded.

    ValueError when an example has media the spec lacks, or a batch needs more items."""
    media = dict(media or {})
    for ex in examples:
        extra = sorted(k for k in ex if k in MEDIA_KEYS and k not in media)
        if extra:
            raise ValueError(f"examples carry {extra} arrays but the data config's media spec "
                             f"only has {sorted(media)}; set DataConfig.media")
    out = {}
    for key, (cap, shape, *_) in media.items():
        items = [ex[key] for ex in examples if key in ex and len(ex[key])]
        arr = np.zeros((cap, *shape), np.float32)
        n = sum(len(x) for x in items)
        if n > cap:
            raise ValueError(f"batch needs {n} {key} items but the media spec allows {cap}; "
                             "raise max_items or lower the batch size")
        for x in items:
            if tuple(x.shape[1:]) != tuple(shape):
                raise ValueError(f"{key} items have shape {tuple(x.shape[1:])}, expected "
                                 f"{tuple(shape)}")
        if items:
            arr[:n] = np.concatenate(items)
        out[key] = arr
    return out


def choose_bucket(length: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= length (buckets ascending)."""
    for b in buckets:
        if length <= b:
            return int(b)
    raise ValueError(f"choose_bucket: length {length} exceeds the largest bucket {buckets[-1]}")


def pad_batch(examples: Sequence[Mapping[str, np.ndarray]], batch_size: int,
              buckets: Sequence[int], pad_id: int = 0,
              pad_values: Mapping[str, int] | None = None,
              media: MediaSpec | None = None, process_index: int = 0,
              speech: Mapping[str, int] | None = None,
              gen: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """One example per row, padded to the smallest bucket fitting the longest example.

    Rows beyond len(examples) are all padding (segment_ids 0), so the shape stays static.
    speech: DataConfig.speech static lengths for speech-out targets (data.speech).
    gen: DataConfig.gen_image, the image-out targets' shape (data.gen_image).
    """
    if not 0 < len(examples) <= batch_size:
        raise ValueError(f"pad_batch: expected 1..{batch_size} examples, got {len(examples)}")
    seq = choose_bucket(max(example_length(e) for e in examples), buckets)
    keys = _batch_keys(examples)
    out = _empty_batch(keys, batch_size, seq, pad_id, pad_values)
    for r, ex in enumerate(examples):
        n = example_length(ex)
        for k in keys[:-2]:
            out[k][r, :n] = ex[k]
        out["segment_ids"][r, :n] = 1
        out["positions"][r, :n] = np.arange(n, dtype=np.int32)
    _add_media(out, [(r, 0, ex) for r, ex in enumerate(examples)], media, process_index)
    out.update(collate_speech(examples, batch_size, speech or {}))
    first_image = process_index * media["image"][0] if media and "image" in media else 0
    out.update(collate_gen(examples, batch_size, gen or {}, first_image))
    return out


class FirstFitPacker:
    """Packs examples into [batch_size, seq_len] rows, each into the first row with room.

    `add` returns False when the example fits in no row (the caller then emits the batch
    and starts a new one with it). Examples longer than seq_len are rejected with ValueError.
    """

    def __init__(self, batch_size: int, seq_len: int, pad_id: int = 0,
                 pad_values: Mapping[str, int] | None = None,
                 media: MediaSpec | None = None, process_index: int = 0) -> None:
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"FirstFitPacker: batch_size and seq_len must be positive, got "
                             f"{batch_size}, {seq_len}")
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
        self.pad_values = dict(pad_values or {})
        self.media, self.process_index = media, process_index
        self.reset()

    def reset(self) -> None:
        self._rows: list[list[Mapping[str, np.ndarray]]] = [[] for _ in range(self.batch_size)]
        self._used = [0] * self.batch_size
        self.num_examples = 0

    @property
    def empty(self) -> bool:
        return self.num_examples == 0

    @property
    def num_tokens(self) -> int:
        return sum(self._used)

    def add(self, example: Mapping[str, np.ndarray]) -> bool:
        n = example_length(example)
        per_example = sorted(k for k in example if k in SPEECH_KEYS or k in GEN_KEYS)
        if per_example:
            raise ValueError(f"FirstFitPacker: examples with speech / image-out targets "
                             f"{per_example} cannot be packed; set the stage's "
                             f"data.packing=False")
        if n > self.seq_len:
            raise ValueError(f"FirstFitPacker: example of length {n} exceeds seq_len "
                             f"{self.seq_len}")
        for r in range(self.batch_size):
            if self._used[r] + n <= self.seq_len:
                self._rows[r].append(example)
                self._used[r] += n
                self.num_examples += 1
                return True
        return False

    def emit(self) -> dict[str, np.ndarray]:
        """The packed batch (static shape), then reset."""
        first = next((row[0] for row in self._rows if row), None)
        keys = _batch_keys([first] if first is not None else [])
        out = _empty_batch(keys, self.batch_size, self.seq_len, self.pad_id, self.pad_values)
        placed = []
        for r, row in enumerate(self._rows):
            start = 0
            for seg, ex in enumerate(row, start=1):
                n = example_length(ex)
                if sorted(_token_keys(ex)) != sorted(keys[:-2]):
                    raise ValueError(f"FirstFitPacker: examples disagree on keys: "
                                     f"{sorted(keys[:-2])} vs {sorted(_token_keys(ex))}")
                for k in keys[:-2]:
                    out[k][r, start:start + n] = ex[k]
                out["segment_ids"][r, start:start + n] = seg
                out["positions"][r, start:start + n] = np.arange(n, dtype=np.int32)
                placed.append((r, start, ex))
                start += n
        _add_media(out, placed, self.media, self.process_index)
        self.reset()
        return out


def pack_examples(examples: Sequence[Mapping[str, np.ndarray]], batch_size: int, seq_len: int,
                  pad_id: int = 0, pad_values: Mapping[str, int] | None = None,
                  media: MediaSpec | None = None, process_index: int = 0
                  ) -> list[dict[str, np.ndarray]]:
    """Pack a list of training examples into as many [batch_size, seq_len] batches as needed."""
    packer = FirstFitPacker(batch_size, seq_len, pad_id, pad_values, media, process_index)
    batches = []
    for ex in examples:
        if not packer.add(ex):
            batches.append(packer.emit())
            packer.add(ex)
    if not packer.empty:
        batches.append(packer.emit())
    return batches
