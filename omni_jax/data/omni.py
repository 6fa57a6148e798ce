"""Omni records -> model examples: chat template + media features, and media batching.

A record (see data.fixtures) is {"messages": [...ChatML parts...], "images": [ref, ...],
"videos": [ref | [frame ref, ...], ...], "audios": [ref, ...]} where a ref is a path or bytes
(data.sources resolves JSONL paths). `OmniEncoder(record)` returns the template's per-token
arrays (input_ids, loss_mask, modality, item_index) plus one float array per present modality:
image [n, H, W, 3], video [n, frames, H, W, 3], audio [n, n_mels, mel_frames], each at the
static shape the model's tower expects, so placeholders expand to `tokens_per_item`.

Two-view (Ola) image tower (lowres_size set): each image gives its high-res view on the
image_size canvas (`image`) and its low-res view on the lowres_size canvas (`image_lowres`),
both sized by Ola's rules and padded centred with gray (features.image.ola_canvas_views); one
placeholder per image, expanded to the two-view token count.

Chunked ("ola_audio") audio tower: each clip is cut into chunk_seconds pieces (last one
zero-padded; more than the encoder's max_chunks: the rest dropped, as Ola's loader), each chunk
gets its own Whisper log-mel (per-chunk normalization, as Ola), giving audio
[n, num_chunks, n_mels, mel_frames] (+ audio_wave [n, num_chunks, chunk_samples] with BEATs).
A clip with fewer chunks than the tower's static num_chunks is padded with silence chunks (zero
samples; their tokens are real, unmasked LLM inputs, so the token count per item stays fixed); a
clip with more chunks (after the max_chunks cap) is a ValueError: raise num_chunks up to
max_chunks, and with num_chunks == max_chunks long clips are truncated instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from omni_jax.data.features import audio as afeat
from omni_jax.data.features import image as ifeat
from omni_jax.data.features import video as vfeat
from omni_jax.data.features.config import AudioConfig, ImageConfig
from omni_jax.data.sources import CorruptMediaError, read_media
from omni_jax.data.template import ChatTemplate
from omni_jax.encoders.audio_path import chunk_waveform
from omni_jax.model import (
    AUDIO_WAVE,
    IMAGE_LOWRES,
    drops_blank_frames,
    frame_tokens,
    media_shapes,
    tokens_per_item,
    uses_audio_wave,
)
from omni_jax.omni_config import CHUNKED_ENCODERS, MODALITIES, OmniConfig

RECORD_KEYS = {"image": "images", "video": "videos", "audio": "audios"}
# OmniEncoder.media's frames per clip of a short_clips="drop" video tower ([n] int32): it sets
# each clip's placeholder count (token_counts) and is not a batch array
VIDEO_FRAMES = "video_frames"


def _refs(record: Mapping[str, Any], modality: str) -> list[Any]:
    value = record.get(RECORD_KEYS[modality], record.get(modality))
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def expand_placeholders(messages: Sequence[Mapping[str, Any]], token: str,
                        per_item: Sequence[int]) -> list[dict[str, Any]]:
    """Each image placeholder (an {"type": "image"} part or a literal token in text), in
    order, repeated per_item[k] times: one placeholder per view of a tiled image."""
    k = 0

    def grow(n: int) -> int:
        nonlocal k
        if k >= len(per_item):
            raise ValueError(f"record has more image placeholders than its {len(per_item)} "
                             f"image(s)")
        k += 1
        return per_item[k - 1] * n

    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            pieces = content.split(token)
            content = pieces[0] + "".join(token * grow(1) + p for p in pieces[1:])
        else:
            parts = []
            for p in content:
                if p.get("type") == "image":
                    parts += [dict(p)] * grow(1)
                elif p.get("type") == "text" and token in p.get("text", ""):
                    pieces = p["text"].split(token)
                    parts.append({**p, "text": pieces[0] + "".join(
                        token * grow(1) + q for q in pieces[1:])})
                else:
                    parts.append(p)
            content = parts
        out.append({**m, "content": content})
    return out


class OmniEncoder:
    """Callable record -> example dict for the grain pipeline (an `encode_fn`)."""

    def __init__(self, config: OmniConfig, template: ChatTemplate,
                 image: ImageConfig | None = None, audio: AudioConfig | None = None,
                 speech: Any = None, gen: Any = None,
                 transcript_tasks: Sequence[str] = ()) -> None:
        """speech: a data.speech.SpeechTargets adding speech-out targets to records with a
        spoken answer (None: speech fields of records are ignored); gen: a
        data.gen_image.GenTargets adding image-out targets (None: gen_image fields ignored);
        transcript_tasks: record tasks whose answer transcribes the audio or captions the
        image: every example then carries `transcript_mask` (see transcript_mask), for the
        `audio_ctc` and `image_bow` losses."""
        self.config, self.template, self.speech, self.gen = config, template, speech, gen
        if isinstance(transcript_tasks, str) or not all(
                isinstance(t, str) and t for t in transcript_tasks):
            raise ValueError(f"OmniEncoder: transcript_tasks must be a sequence of task names, "
                             f"got {transcript_tasks!r}")
        if transcript_tasks and config.audio is None and config.image is None:
            raise ValueError("OmniEncoder: transcript_tasks need a model with an audio tower "
                             "or an image tower")
        self.transcript_tasks = tuple(transcript_tasks)
        self._specials = np.asarray(sorted(template.tokenizer.special_ids.values()), np.int32
                                    ) if transcript_tasks else np.zeros(0, np.int32)
        self.counts = {m: tokens_per_item(config, m) for m in MODALITIES if getattr(config, m)}
        self.image_cfg = image or ImageConfig()
        for m in ("image", "video"):
            t = getattr(config, m)
            if t is not None and not t.two_views and t.image_size[0] != t.image_size[1]:
                raise ValueError(f"OmniEncoder: {m} tower image_size {t.image_size} must be "
                                 "square (SigLIP preprocessing resizes to S x S)")
        self.audio_cfg = audio
        if config.audio is not None:
            self.audio_cfg = (audio or AudioConfig()).replace(pad_to_chunk=True)
            if config.audio.encoder in CHUNKED_ENCODERS:
                self._check_chunked(self.audio_cfg)
            elif self.audio_cfg.n_frames != config.audio.num_frames:
                raise ValueError(f"OmniEncoder: audio features give {self.audio_cfg.n_frames} mel "
                                 f"frames per clip but the audio tower expects "
                                 f"{config.audio.num_frames}; set AudioConfig.chunk_seconds")

    def _check_chunked(self, a: AudioConfig) -> None:
        t = self.config.audio
        c = t.encoder_config
        got = (a.n_samples, a.sampling_rate, a.hop_length, a.n_mels)
        want = (c.chunk_samples, c.sample_rate, c.mel_hop_length, c.whisper.num_mel_bins)
        if got != want:
            raise ValueError(f"OmniEncoder: audio features (chunk samples, sampling_rate, "
                             f"hop_length, n_mels) = {got} but the {t.encoder} tower expects "
                             f"{want}; set AudioConfig.chunk_seconds={c.chunk_seconds:g} and "
                             f"n_mels={c.whisper.num_mel_bins}")

    def audio_chunks(self, wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Chunked tower: waveform [samples] -> (log-mel [num_chunks, n_mels, frames], chunk
        waveforms [num_chunks, chunk_samples]), silence-padded to num_chunks (module doc)."""
        t = self.config.audio
        chunks, _ = chunk_waveform(wave, t.encoder_config)  # capped at max_chunks
        if chunks.shape[0] > t.num_chunks:
            raise ValueError(f"audio item of {wave.shape[0] / self.audio_cfg.sampling_rate:.2f} "
                             f"s gives {chunks.shape[0]} chunks of "
                             f"{t.encoder_config.chunk_seconds:g} s but the audio tower takes "
                             f"num_chunks={t.num_chunks}; raise num_chunks (<= max_chunks="
                             f"{t.encoder_config.max_chunks}) or trim the clip")
        chunks = np.pad(chunks, ((0, t.num_chunks - chunks.shape[0]), (0, 0)))
        mel, _ = afeat.log_mel_batch(chunks, self.audio_cfg)  # per-chunk normalization
        return mel, chunks

    def _pixels(self, images: Sequence[np.ndarray], size: int) -> np.ndarray:
        return ifeat.preprocess(images, self.image_cfg.replace(image_size=size), num_threads=1)

    def _image(self, ref: Any) -> np.ndarray:
        return ifeat.to_rgb(ifeat.decode_image(read_media(ref)), self.image_cfg.strict_channels)

    def _video(self, ref: Any) -> np.ndarray:
        """One clip -> [num_frames, S, S, 3] pixels (a short clip per short_clips)."""
        return self._clip(ref)[0]

    def _clip(self, ref: Any) -> tuple[np.ndarray, int]:
        """One clip -> (its pixels, as _video; how many of them are the clip's own frames)."""
        t = self.config.video
        repeat = t.short_clips == "repeat"
        if isinstance(ref, list | tuple):  # a list of frame images
            if not ref:
                raise ValueError("video: empty frame list; expected at least one frame")
            frames = [self._image(r) for r in ref]
            if len({f.shape for f in frames}) != 1:
                raise ValueError("video: frames differ in size; expected one size per video")
            frames = vfeat.sample_frames(np.stack(frames), t.num_frames, repeat)
        else:
            frames = vfeat.decode_video(read_media(ref), t.num_frames, repeat)
        if t.adapter in ("ola_lgap",):  # Ola: frame area clamped, sides x 64, gray canvas
            pixels = ifeat.ola_frames(list(frames), self.image_cfg, t.image_size)
        else:
            pixels = self._pixels(list(frames), t.image_size[0])  # [T', S, S, 3]
        own = pixels.shape[0]
        blank = t.num_frames - own  # short_clips "pad" / "drop" / "pad_front": blank frames
        if not blank:  # after / before the clip
            return pixels, own
        before = blank if t.short_clips == "pad_front" else 0
        return np.pad(pixels, ((before, blank - before), (0, 0), (0, 0), (0, 0))), own

    def views(self, rgb: np.ndarray) -> np.ndarray:
        """Tiling image tower: one image -> its tiles (best grid of up to max_tiles) then the
        thumbnail, [rows * cols + 1, S, S, 3] normalised pixels (Capybara's any-res input)."""
        t = self.config.image
        cfg = self.image_cfg.replace(image_size=t.image_size[0], max_tiles=t.max_tiles)
        return ifeat.tile_image(rgb, cfg).views()

    def ola_views(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Two-view image tower: one image -> (low-res [h, w, 3], high-res [H, W, 3]) normalised
        pixels on the tower's static canvases (module docstring)."""
        t = self.config.image
        return ifeat.ola_canvas_views(rgb, self.image_cfg, t.lowres_size, t.image_size)

    def messages(self, record: Mapping[str, Any], views: Sequence[int] | None = None
                 ) -> list[dict[str, Any]]:
        """record["messages"], with a tiling image tower's placeholders repeated per view
        (views: image_views(record), when already known)."""
        messages = list(record["messages"])
        if not self.tiles(record):
            return messages
        per_image = self.image_views(record) if views is None else views
        return expand_placeholders(messages, self.template.tokenizer.placeholder_token("image"),
                                   per_image)

    def tiles(self, record: Mapping[str, Any]) -> bool:
        """Whether the record has images and the image tower tiles them."""
        t = self.config.image
        return bool(_refs(record, "image")) and t is not None and bool(t.max_tiles)

    def image_views(self, record: Mapping[str, Any]) -> list[int]:
        """Items each of the record's images becomes (1 each without tiling)."""
        refs = _refs(record, "image")
        if not self.tiles(record):
            return [1] * len(refs)
        return [self.num_views(self._image(r)) for r in refs]

    def num_views(self, rgb: np.ndarray) -> int:
        """Items one image becomes on this model (1 without tiling)."""
        t = self.config.image
        if not t.max_tiles:
            return 1
        rows, cols = ifeat.select_grid(*rgb.shape[:2], t.image_size[0], t.max_tiles)
        return rows * cols + 1

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
            try:
                out.update(self._decode(m, refs))
            except (ValueError, OSError) as e:
                rid = record.get("id", "?")
                raise CorruptMediaError(f"record {rid!r}: {m} item unreadable: {e}") from e
        return out

    def _decode(self, m: str, refs: list[Any]) -> dict[str, np.ndarray]:
        """Decode and preprocess the items of one modality."""
        out: dict[str, np.ndarray] = {}
        if m == "image" and self.config.image.max_tiles:
            out[m] = np.concatenate([self.views(self._image(r)) for r in refs])
        elif m == "image" and self.config.image.two_views:
            low, high = zip(*(self.ola_views(self._image(r)) for r in refs))
            out[m], out[IMAGE_LOWRES] = np.stack(high), np.stack(low)
        elif m == "image":
            out[m] = self._pixels([self._image(r) for r in refs],
                                  self.config.image.image_size[0])
        elif m == "video":
            clips = [self._clip(r) for r in refs]
            out[m] = np.stack([pixels for pixels, _ in clips])
            if drops_blank_frames(self.config):
                out[VIDEO_FRAMES] = np.asarray([own for _, own in clips], np.int32)
        else:
            waves = [afeat.decode_audio(read_media(r), self.audio_cfg) for r in refs]
            if self.config.audio.encoder not in CHUNKED_ENCODERS:
                out[m], _ = afeat.log_mel_batch(waves, self.audio_cfg)
                return out
            mels, chunks = zip(*(self.audio_chunks(w) for w in waves))
            out[m] = np.stack(mels)
            if uses_audio_wave(self.config):
                out[AUDIO_WAVE] = np.stack(chunks)
        return out

    def token_counts(self, media: Mapping[str, np.ndarray]) -> dict[str, list[int]]:
        """Placeholder tokens per item of each modality in `media` (self.media's output): the
        tower's count, a short_clips="drop" clip its own frames' tokens only."""
        counts = {m: [self.counts[m]] * len(v) for m, v in media.items() if m in MODALITIES}
        if VIDEO_FRAMES in media:
            counts["video"] = [int(k) * frame_tokens(self.config) for k in media[VIDEO_FRAMES]]
        return counts

    def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if "messages" not in record:
            raise ValueError(f"record has no 'messages'; keys: {sorted(record)}")
        media = self.media(record)
        counts = self.token_counts(media)
        media.pop(VIDEO_FRAMES, None)
        views = self.image_views(record) if self.gen is not None else None
        example = self.template.encode(self.messages(record, views), media_token_counts=counts)
        out = {**example.to_dict(), **media}
        if self.transcript_tasks:
            out["transcript_mask"] = self.transcript_mask(record, out)
        if self.gen is not None:
            out = self.gen(out, record, decode=lambda ref: self._target(record, ref),
                           image_items=views)
        return out if self.speech is None else self.speech(out, record)

    def transcript_mask(self, record: Mapping[str, Any], example: Mapping[str, np.ndarray]
                        ) -> np.ndarray:
        """[seq] int32: 1 on the answer tokens of a record whose task is a transcript task and
        which has audio or an image (special tokens such as <|im_end|> excluded), else all 0."""
        ids = example["input_ids"]
        if record.get("task") not in self.transcript_tasks or not (
                {"audio", "image"} & set(example)):
            return np.zeros(ids.shape, np.int32)
        keep = (example["loss_mask"] > 0) & ~np.isin(ids, self._specials)
        return keep.astype(np.int32)

    def _target(self, record: Mapping[str, Any], ref: Any) -> np.ndarray:
        """An image-out target -> uint8 RGB; CorruptMediaError when unreadable."""
        try:
            return self._image(ref)
        except (ValueError, OSError) as e:
            rid = record.get("id", "?")
            raise CorruptMediaError(f"record {rid!r}: gen_image target unreadable: {e}") from e


def media_spec(config: OmniConfig, max_items: Mapping[str, int],
               audio: AudioConfig | None = None) -> dict[str, dict[str, Any]]:
    """DataConfig.media for this model: {key: {"max_items", "shape"(, "tokens")}} per batch
    media key (model.media_shapes; tokens: an item's embeddings, image / video / audio);
    max_items gives the per-batch item budget of each modality (missing ones default to 1;
    audio_wave shares the audio budget, image_lowres the image one).
    `audio` sets n_mels of a plain Whisper tower (a chunked tower takes its own encoder's)."""
    shapes = media_shapes(config)
    if config.audio is not None and config.audio.encoder not in CHUNKED_ENCODERS:
        shapes["audio"] = ((audio or AudioConfig()).n_mels, config.audio.num_frames)
    unknown = sorted(set(max_items) - set(MODALITIES).intersection(shapes))
    if unknown:
        raise ValueError(f"media_spec: max_items names {unknown}, which the model has no tower "
                         f"for; towers: {sorted(set(MODALITIES).intersection(shapes))}")
    budget = dict(max_items)
    budget.setdefault(AUDIO_WAVE, budget.get("audio", 1))
    budget.setdefault(IMAGE_LOWRES, budget.get("image", 1))
    return {m: {"max_items": int(budget.get(m, 1)), "shape": list(s),
                **({"tokens": tokens_per_item(config, m)} if m in MODALITIES else {})}
            for m, s in shapes.items()}
