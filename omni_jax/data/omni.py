"""Omni records -> model examples: chat template + media features, and media batching.

A record (see data.fixtures) is {"messages": [...ChatML parts...], "images": [ref, ...],
"videos": [ref | [frame ref, ...], ...], "audios": [ref, ...]} where a ref is a path or bytes
(data.sources resolves JSONL paths). `OmniEncoder(record)` returns the template's per-token
arrays (input_ids, loss_mask, modality, item_index) plus one float array per present modality:
image [n, H, W, 3], video [n, frames, H, W, 3], audio [n, n_mels, mel_frames], each at the
static shape the model's tower expects, so placeholders expand to `tokens_per_item`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from omni_jax.data.features import audio as afeat
from omni_jax.data.features import image as ifeat
from omni_jax.data.features import video as vfeat
from omni_jax.data.features.config import AudioConfig, ImageConfig
from omni_jax.data.sources import read_media
from omni_jax.data.template import ChatTemplate
from omni_jax.model import tokens_per_item
from omni_jax.omni_config import MODALITIES, OmniConfig

RECORD_KEYS = {"image": "images", "video": "videos", "audio": "audios"}


def _refs(record: Mapping[str, Any], modality: str) -> list[Any]:
    value = record.get(RECORD_KEYS[modality], record.get(modality))
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


class OmniEncoder:
    """Callable record -> example dict for the grain pipeline (an `encode_fn`)."""

    def __init__(self, config: OmniConfig, template: ChatTemplate,
                 image: ImageConfig | None = None, audio: AudioConfig | None = None) -> None:
        self.config, self.template = config, template
        self.counts = {m: tokens_per_item(config, m) for m in MODALITIES if getattr(config, m)}
        self.image_cfg = image or ImageConfig()
        for m in ("image", "video"):
            t = getattr(config, m)
            if t is not None and t.image_size[0] != t.image_size[1]:
                raise ValueError(f"OmniEncoder: {m} tower image_size {t.image_size} must be "
                                 "square (SigLIP preprocessing resizes to S x S)")
        self.audio_cfg = audio
        if config.audio is not None:
            self.audio_cfg = (audio or AudioConfig()).replace(pad_to_chunk=True)
            if self.audio_cfg.n_frames != config.audio.num_frames:
                raise ValueError(f"OmniEncoder: audio features give {self.audio_cfg.n_frames} mel "
                                 f"frames per clip but the audio tower expects "
                                 f"{config.audio.num_frames}; set AudioConfig.chunk_seconds")

    def _pixels(self, images: Sequence[np.ndarray], size: int) -> np.ndarray:
        return ifeat.preprocess(images, self.image_cfg.replace(image_size=size), num_threads=1)

    def _image(self, ref: Any) -> np.ndarray:
        return ifeat.to_rgb(ifeat.decode_image(read_media(ref)), self.image_cfg.strict_channels)

    def _video(self, ref: Any) -> np.ndarray:
        t = self.config.video
        if isinstance(ref, list | tuple):  # a list of frame images
            if not ref:
                raise ValueError("video: empty frame list; expected at least one frame")
            frames = [self._image(r) for r in ref]
            if len({f.shape for f in frames}) != 1:
                raise ValueError("video: frames differ in size; expected one size per video")
            frames = vfeat.sample_frames(np.stack(frames), t.num_frames)
        else:
            frames = vfeat.decode_video(read_media(ref), t.num_frames)
        return self._pixels(list(frames), t.image_size[0])

    def media(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Decode and preprocess every media item of a record."""
        out: dict[str, np.ndarray] = {}
        for m in MODALITIES:
            refs = _refs(record, m)
            if not refs:
                continue
            if getattr(self.config, m) is None:
                raise ValueError(f"record has {len(refs)} {m} item(s) but the model has no {m} "
                                 "tower")
            if m == "image":
                out[m] = self._pixels([self._image(r) for r in refs],
                                      self.config.image.image_size[0])
            elif m == "video":
                out[m] = np.stack([self._video(r) for r in refs])
            else:
                waves = [afeat.decode_audio(read_media(r), self.audio_cfg) for r in refs]
                out[m], _ = afeat.log_mel_batch(waves, self.audio_cfg)
        return out

    def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if "messages" not in record:
            raise ValueError(f"record has no 'messages'; keys: {sorted(record)}")
        media = self.media(record)
        counts = {m: [self.counts[m]] * len(v) for m, v in media.items()}
        example = self.template.encode(record["messages"], media_token_counts=counts)
        return {**example.to_dict(), **media}


def media_spec(config: OmniConfig, max_items: Mapping[str, int],
               audio: AudioConfig | None = None) -> dict[str, dict[str, Any]]:
    """DataConfig.media for this model: {modality: {"max_items", "shape"}} per configured tower;
    max_items gives the per-batch item budget of each modality (missing ones default to 1)."""
    shapes = {}
    if config.image is not None:
        shapes["image"] = (*config.image.image_size, 3)
    if config.video is not None:
        shapes["video"] = (config.video.num_frames, *config.video.image_size, 3)
    if config.audio is not None:
        n_mels = (audio or AudioConfig()).n_mels
        shapes["audio"] = (n_mels, config.audio.num_frames)
    unknown = sorted(set(max_items) - set(shapes))
    if unknown:
        raise ValueError(f"media_spec: max_items names {unknown}, which the model has no tower "
                         f"for; towers: {sorted(shapes)}")
    return {m: {"max_items": int(max_items.get(m, 1)), "shape": list(s)}
            for m, s in shapes.items()}
