"""Image-out targets (X-VILA): a record's target image for its {"type": "gen_image"} part, and
their static batching.

A generation record is an omni record whose assistant turn holds a {"type": "gen_image"} part
(rendered as the template's K generation tokens) and gives
  "gen_image": ref       the image that part should produce (a path / bytes, as other media);
  "veh_image": int|null  optional: which of the record's "images" the visual embedding highway
                         carries to the decoder (default: the first, when the record has
                         images; null: none, e.g. an edit that should not copy its input).
`GenTargets(example, record)` adds to an encoded example (before shifting):
  gen_image [H, W, C] float32 in [-1, 1]: the decoder's space (resized to its image_size, gray
    as ITU-R 601 luma when it has one channel);
  veh_item [1] int32: the row of the highway's source among the example's image items (a
    tiling tower's items are views: the image's thumbnail), -1 for none.
`collate_gen` gives every batch, static whatever its rows hold: gen_image [B, H, W, C],
gen_image_mask [B] int32 (1 = the row has a target), veh_index [B] int32 (the source's row in
the global image array: this process's offset added; -1 = none); the pipeline adds gen_seed
[B] (each row's diffusion noise / timestep seed, from the batch counter: resumable).
Packing is not supported (one conversation per row).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

GEN_KEYS = ("gen_image", "veh_item")  # per-example arrays an encoded example may carry
BATCH_KEYS = ("gen_image", "gen_image_mask", "veh_index", "gen_seed")  # what a batch carries
LUMA = np.array([0.299, 0.587, 0.114])


def check_gen_spec(spec: Mapping[str, Any] | None) -> dict[str, tuple[int, ...]]:
    """DataConfig.gen_image {"shape": [H, W, C]} (or {}) -> validated."""
    spec = dict(spec or {})
    if not spec:
        return {}
    shape = spec.get("shape")
    if sorted(spec) != ["shape"] or not isinstance(shape, list | tuple) or len(shape) != 3 \
            or not all(isinstance(s, int | np.integer) and not isinstance(s, bool)
                       for s in shape) \
            or any(int(s) <= 0 for s in shape) or int(shape[2]) not in (1, 3) \
            or int(shape[0]) != int(shape[1]):
        raise ValueError(f"DataConfig.gen_image must be {{shape: [S, S, C]}} with C 1 or 3 "
                         f"(the image decoder's square images), got {spec}")
    return {"shape": tuple(int(s) for s in shape)}


def to_decoder_space(rgb: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """uint8 [h, w, 3] -> float32 [H, W, C] in [-1, 1] (bicubic resize; luma for C = 1)."""
    from PIL import Image

    h, w, c = (int(s) for s in shape)
    if rgb.shape[:2] != (h, w):
        rgb = np.asarray(Image.fromarray(rgb).resize((w, h), resample=Image.BICUBIC))
    x = rgb.astype(np.float64)
    if c == 1:
        x = (x @ LUMA)[..., None]
    return (x / 127.5 - 1.0).astype(np.float32)


class GenTargets:
    """Callable (encoded example, record) -> the example with its image-out target (module
    doc); gen_id / k: the generation token and how many the template renders per request."""

    def __init__(self, shape: Sequence[int], gen_id: int, k: int) -> None:
        self.shape = check_gen_spec({"shape": list(shape)})["shape"]
        self.gen_id, self.k = int(gen_id), int(k)

    def __call__(self, example: dict[str, np.ndarray], record: Mapping[str, Any], *,
                 decode: Any, image_items: Sequence[int] = ()) -> dict[str, np.ndarray]:
        """decode: ref -> uint8 [h, w, 3] (the encoder's reader; raises CorruptMediaError);
        image_items: items each of the record's images became (views), in order."""
        rid = record.get("id", "?")
        asks = int(np.sum(np.asarray(example["input_ids"]) == self.gen_id))
        ref = record.get("gen_image")
        if asks not in (0, self.k):
            raise ValueError(f"record {rid!r}: {asks} generation tokens; one gen_image part "
                             f"renders {self.k} (one image out per record)")
        if ref is not None and not isinstance(ref, str | bytes | bytearray | memoryview):
            raise ValueError(f"record {rid!r}: gen_image must be one image (a path or bytes), "
                             f"got {type(ref).__name__}")
        if ref is None:
            if asks:
                raise ValueError(f"record {rid!r} has a gen_image part but no 'gen_image' "
                                 f"target image")
            return example
        if not asks:
            raise ValueError(f"record {rid!r} gives a 'gen_image' target but its messages "
                             f"have no {{'type': 'gen_image'}} part")
        veh = record.get("veh_image", 0 if image_items else None)
        if veh is not None and (isinstance(veh, bool) or not isinstance(veh, int)
                                or not 0 <= veh < len(image_items)):
            raise ValueError(f"record {rid!r}: veh_image={veh!r} must index its "
                             f"{len(image_items)} image(s) (or be null)")
        item = -1 if veh is None else int(np.sum(image_items[:veh + 1])) - 1  # last view
        out = dict(example)
        out["gen_image"] = to_decoder_space(decode(ref), self.shape)
        out["veh_item"] = np.array([item], np.int32)
        return out


def collate_gen(examples: Sequence[Mapping[str, np.ndarray]], batch_size: int,
                spec: Mapping[str, Any], first_image: int = 0) -> dict[str, np.ndarray]:
    """Per-example targets -> gen_image / gen_image_mask / veh_index [batch, ...] (module doc);
    first_image: the global image row of this process's first item. {} without a spec."""
    has = [ex for ex in examples if "gen_image" in ex]
    if not spec:
        if has:
            raise ValueError("examples carry gen_image targets but DataConfig.gen_image is not "
                             "set (expected {shape: [S, S, C]}); in a recipe: image-out "
                             "records reached a stage without the 'diffusion' loss")
        return {}
    shape = tuple(spec["shape"])
    out = {"gen_image": np.zeros((batch_size, *shape), np.float32),
           "gen_image_mask": np.zeros((batch_size,), np.int32),
           "veh_index": np.full((batch_size,), -1, np.int32)}
    row = first_image
    for r, ex in enumerate(examples):
        if "gen_image" in ex:
            if tuple(ex["gen_image"].shape) != shape:
                raise ValueError(f"gen_image of shape {tuple(ex['gen_image'].shape)}, expected "
                                 f"{shape} (DataConfig.gen_image)")
            out["gen_image"][r], out["gen_image_mask"][r] = ex["gen_image"], 1
            item = int(np.asarray(ex["veh_item"]).reshape(-1)[0])
            if item >= 0:
                out["veh_index"][r] = row + item
        row += len(ex["image"]) if "image" in ex else 0
    return out


def gen_seeds(batch_index: int, batch_size: int, process_index: int, local_batch: int
              ) -> np.ndarray:
    """Row seeds of a batch: distinct over batches, processes and rows (int32)."""
    start = (int(batch_index) * int(batch_size) + int(process_index) * int(local_batch))
    return (np.arange(local_batch, dtype=np.int64) + start).astype(np.int32)
