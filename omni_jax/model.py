"""OmniModel: encode media, scatter the embeddings into placeholder positions, run the LLM.

Batch (all static shapes, jit-friendly):
  input_ids [batch, seq] int, modality [batch, seq] int (0 text, 1 image, 2 video, 3 audio;
  data.template's codes), optional segment_ids / positions [batch, seq];
  image [n_img, H, W, 3] float (SigLIP-normalized), video [n_vid, frames, H, W, 3],
  audio [n_aud, n_mels, mel_frames] (Whisper log-mel), or with a chunked ("ola_audio") tower
  audio [n_aud, num_chunks, n_mels, mel_frames] plus, when it has BEATs,
  audio_wave [n_aud, num_chunks, chunk_samples] (the 16 kHz chunk waveforms, same item order);
  with a two-view (Ola) image tower also image_lowres [n_img, h, w, 3] (the low-res view of
  each image, same item order; image then holds the high-res views).
Placeholders of a modality are filled in order: the k-th placeholder position of the batch
(row-major) takes row k of that modality's [n_items * tokens_per_item, D] embeddings, so media
arrays list items in the order they appear. Unused trailing items (padding) are ignored. A batch
may instead give media_index [batch, seq] (data.packing makes it): the row each placeholder
takes, which multi-host batches need (each process pads its own media block).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.llm.decoder import Decoder
from omni_jax.omni_config import (
    CHUNKED_ENCODERS,
    MODALITIES,
    MODALITY_CODE,
    OmniConfig,
    adapter_classes,
    encoder_classes,
)

AUDIO_WAVE = "audio_wave"  # batch key of the chunk waveforms of a chunked audio tower (BEATs)
IMAGE_LOWRES = "image_lowres"  # batch key of the low-res views of a two-view (Ola) image tower
MEDIA_KEYS = (*MODALITIES, AUDIO_WAVE, IMAGE_LOWRES)  # every media array a batch may carry


def _adapter(config: OmniConfig, modality: str, name: str | None = None) -> nn.Module:
    t = getattr(config, modality)
    _, cls, _ = adapter_classes(t.adapter)
    return cls(t.adapter_config, name=name) if name else cls(t.adapter_config)


def tokens_per_item(config: OmniConfig, modality: str) -> int:
    """Embeddings one media item of `modality` becomes (the placeholder count to expand to)."""
    t = getattr(config, modality)
    if t is None:
        raise ValueError(f"this model has no {modality} tower")
    if modality == "audio":
        if t.encoder in CHUNKED_ENCODERS:  # rows per chunk after Whisper/BEATs alignment
            return t.adapter_config.num_tokens(t.encoder_config.num_frames, t.num_chunks)
        return t.adapter_config.num_tokens(t.num_frames // 2, 1)  # Whisper halves mel frames
    adapter = _adapter(config, modality)
    grid = config.encoder_config(modality).grid(*t.image_size)
    if modality == "image" and t.two_views:  # [begin] low rows [sep] high rows [end]
        return adapter.num_tokens(*config.encoder_config(modality).grid(*t.lowres_size), grid)
    if modality == "image":
        return adapter.num_tokens(*grid)
    if hasattr(adapter, "video_num_tokens"):
        return adapter.video_num_tokens(t.num_frames, *grid)
    return t.num_frames * adapter.num_tokens(*grid) // t.frame_pool ** 2


def drops_blank_frames(config: OmniConfig) -> bool:
    """Whether a short clip's blank frames stay out of the LLM's sequence (short_clips="drop")."""
    return config.video is not None and config.video.short_clips == "drop"


def frame_tokens(config: OmniConfig) -> int:
    """Embeddings one video frame becomes (a per-frame video adapter: no ola_lgap)."""
    return tokens_per_item(config, "video") // config.video.num_frames


def uses_audio_wave(config: OmniConfig) -> bool:
    """Whether audio items come with chunk waveforms (`audio_wave`): a chunked tower with BEATs."""
    t = config.audio
    return t is not None and t.encoder in CHUNKED_ENCODERS and t.encoder_config.beats is not None


def media_shapes(config: OmniConfig) -> dict[str, tuple[int, ...]]:
    """Per-item shape of every media array the batch carries for this model (batch key ->
    shape without the leading item axis): image (+ image_lowres), video, audio (+ audio_wave)."""
    out: dict[str, tuple[int, ...]] = {}
    if config.image is not None:
        out["image"] = (*config.image.image_size, 3)
        if config.image.two_views:
            out[IMAGE_LOWRES] = (*config.image.lowres_size, 3)
    if config.video is not None:
        out["video"] = (config.video.num_frames, *config.video.image_size, 3)
    t = config.audio
    if t is not None:
        enc = config.encoder_config("audio")
        if t.encoder in CHUNKED_ENCODERS:
            out["audio"] = (t.num_chunks, enc.whisper.num_mel_bins, t.num_frames)
            if uses_audio_wave(config):
                out[AUDIO_WAVE] = (t.num_chunks, t.encoder_config.chunk_samples)
        else:
            out["audio"] = (enc.num_mel_bins, t.num_frames)
    return out


def _check_audio(config: OmniConfig, batch: Mapping[str, Any]) -> None:
    audio, wave = batch.get("audio"), batch.get(AUDIO_WAVE)
    if wave is not None and not uses_audio_wave(config):
        raise ValueError(f"batch has '{AUDIO_WAVE}' but the model's audio tower takes no "
                         "waveforms (only an 'ola_audio' tower with BEATs does)")
    if audio is None or config.audio is None:
        return
    shapes = media_shapes(config)
    if tuple(np.shape(audio)[1:]) != shapes["audio"]:
        raise ValueError(f"audio must be [n, {', '.join(map(str, shapes['audio']))}] "
                         f"({config.audio.encoder} tower), got {tuple(np.shape(audio))}")
    if uses_audio_wave(config):
        want = (np.shape(audio)[0], *shapes[AUDIO_WAVE])
        if wave is None or tuple(np.shape(wave)) != want:
            got = None if wave is None else tuple(np.shape(wave))
            raise ValueError(f"the BEATs branch needs '{AUDIO_WAVE}' [n, chunks, samples] = "
                             f"{want} next to audio, got {got}")


def _check_lowres(config: OmniConfig, batch: Mapping[str, Any]) -> None:
    image, low = batch.get("image"), batch.get(IMAGE_LOWRES)
    two = config.image is not None and config.image.two_views
    if low is not None and not two:
        raise ValueError(f"batch has '{IMAGE_LOWRES}' but the model's image tower takes one "
                         "view per image (set the tower's lowres_size for Ola's two views)")
    if image is None or not two:
        return
    want = (np.shape(image)[0], *media_shapes(config)[IMAGE_LOWRES])
    if low is None or tuple(np.shape(low)) != want:
        got = None if low is None else tuple(np.shape(low))
        raise ValueError(f"the two-view image tower needs '{IMAGE_LOWRES}' [n, h, w, 3] = "
                         f"{want} next to image (one low-res view per image), got {got}")


def check_batch(config: OmniConfig, batch: Mapping[str, Any]) -> None:
    """Host-side validation before compute: shapes, media present, placeholder counts."""
    ids = np.asarray(batch["input_ids"])
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    if ids.shape[1] > config.llm.max_position_embeddings:
        raise ValueError(f"sequence length {ids.shape[1]} exceeds the model's maximum "
                         f"{config.llm.max_position_embeddings}")
    modality = batch.get("modality")
    if modality is not None and np.shape(modality) != ids.shape:
        raise ValueError(f"modality must match input_ids {ids.shape}, got {np.shape(modality)}")
    for m in MODALITIES:
        count = 0 if modality is None else int(np.sum(np.asarray(modality) == MODALITY_CODE[m]))
        items = batch.get(m)
        if count and items is None:
            raise ValueError(f"batch has {count} {m} placeholder positions but no {m} array")
        if items is None:
            continue
        if getattr(config, m) is None:
            raise ValueError(f"batch has {m} inputs but the model has no {m} tower")
        per = tokens_per_item(config, m)
        n = np.shape(items)[0]
        # short_clips="drop": a clip brings its own frames' tokens only (media_index maps them)
        unit = frame_tokens(config) if m == "video" and drops_blank_frames(config) else per
        if count % unit or count > n * per:
            raise ValueError(f"batch has {count} {m} placeholder positions, which is not a whole "
                             f"number of {'frames' if unit < per else 'items'} of {unit} tokens "
                             f"within the {n} {m} items of {per} tokens given")
        if unit < per and count and batch.get("media_index") is None:
            raise ValueError("video short_clips='drop' gives clips a variable number of tokens: "
                             "the batch needs the media_index the data pipeline (or "
                             "infer.omni.collate_prompts) gives it")
        if batch.get("media_index") is not None and count:
            rows = np.asarray(batch["media_index"])[np.asarray(modality) == MODALITY_CODE[m]]
            if rows.min() < 0 or rows.max() >= n * per:
                raise ValueError(f"media_index of {m} placeholders spans rows [{rows.min()}, "
                                 f"{rows.max()}] but the {n} {m} items give rows [0, {n * per})")
            first = None if unit == per else np.r_[True, rows[1:] // per != rows[:-1] // per]
            if first is not None and (rows[first] % per).any():  # each clip's first row
                raise ValueError(f"media_index of {m} placeholders starts a clip inside an item "
                                 f"of {per} rows: give the data config's media spec the tokens "
                                 "per item (data.omni.media_spec)")
    _check_audio(config, batch)
    _check_lowres(config, batch)


class OmniModel(nn.Module):
    """LLM + per-modality encoder/adapter towers (+ optional X-VILA visual highway)."""

    config: OmniConfig

    def setup(self) -> None:
        c = self.config
        self.llm = Decoder(c.llm, name="llm")
        for m in MODALITIES:
            t = getattr(c, m)
            if t is not None and t.shared_with is None:
                _, enc_cls = encoder_classes(t.encoder)
                if t.encoder in CHUNKED_ENCODERS:  # per item [chunks, ...]; shared weights
                    enc_cls = nn.vmap(enc_cls, in_axes=0, out_axes=0,
                                      variable_axes={"params": None},
                                      split_rngs={"params": False})
                setattr(self, f"{m}_encoder", enc_cls(t.encoder_config, name=f"{m}_encoder"))
            if t is not None:
                setattr(self, f"{m}_adapter", _adapter(c, m, f"{m}_adapter"))
        if c.video is not None and c.video.frame_embed:  # TowerConfig.frame_embed
            self.video_frame_embed = self.param(
                "video_frame_embed", nn.initializers.zeros,
                (c.video.num_frames, c.llm.hidden_size), jnp.float32)
        if c.highway is not None:
            from omni_jax.adapters.highway import VisualHighway

            self.highway = VisualHighway(c.highway, name="highway")

    def _encoder(self, modality: str) -> nn.Module:
        t = getattr(self.config, modality)
        return getattr(self, f"{t.shared_with or modality}_encoder")

    def visual_features(self, modality: str, pixels: jax.Array, *, lowres: bool = False
                        ) -> tuple[jax.Array, tuple]:
        """image [n, H, W, 3] or video [n, F, H, W, 3] -> patch features [n(*F), P, C], grid
        (lowres: the low-res views image_lowres [n, h, w, 3] of a two-view image tower)."""
        t = getattr(self.config, modality)
        size = t.lowres_size if lowres else t.image_size
        expect = (pixels.ndim == 4) if modality == "image" else (pixels.ndim == 5)
        if not expect or tuple(pixels.shape[-3:-1]) != size:
            want = "[n, H, W, 3]" if modality == "image" else "[n, frames, H, W, 3]"
            name = IMAGE_LOWRES if lowres else modality
            raise ValueError(f"{name} must be {want} with (H, W) = {size}, got "
                             f"{tuple(pixels.shape)}")
        if modality == "video" and pixels.shape[1] != t.num_frames:
            raise ValueError(f"video must have {t.num_frames} frames, got {pixels.shape[1]}")
        flat = pixels.reshape(-1, *pixels.shape[-3:])
        return self._encoder(modality)(flat), self.config.encoder_config(modality).grid(*size)

    def audio_features(self, mel: jax.Array, wave: jax.Array | None = None) -> jax.Array:
        """Chunked tower: mel [n, chunks, n_mels, frames] (+ wave [n, chunks, samples]) ->
        [n, chunks, rows, C] encoder features, [whisper | beats] channels, what the adapter sees."""
        _check_audio(self.config, {"audio": mel, AUDIO_WAVE: wave})
        return self.audio_encoder(mel, wave)["features"]

    def encode(self, modality: str, media: jax.Array, wave: jax.Array | None = None,
               features: dict | None = None, lowres: jax.Array | None = None) -> jax.Array:
        """Media items -> [n_items, tokens_per_item, D] LLM-space embeddings (`wave`: the
        audio_wave array of a chunked audio tower with BEATs; `lowres`: the image_lowres views
        of a two-view image tower, `media` then the high-res views). `features`, if given,
        receives the visual encoder's (patch features, grid) of this call (the highway reuses
        them; two views: the high-res ones)."""
        adapter = getattr(self, f"{modality}_adapter")
        if modality == "audio":
            t = self.config.audio
            if t.encoder in CHUNKED_ENCODERS:  # Ola: per-chunk rows + newline per chunk
                return adapter(self.audio_features(media, wave))
            if wave is not None:
                _check_audio(self.config, {AUDIO_WAVE: wave})
            if media.ndim != 3 or media.shape[-1] != t.num_frames:
                raise ValueError(f"audio must be [n, n_mels, {t.num_frames}] log-mel, got "
                                 f"{tuple(media.shape)}")
            return adapter(self.audio_encoder(media)[:, None])  # one chunk per item
        if lowres is not None and modality != "image":
            raise ValueError(f"{IMAGE_LOWRES} views are for images, not {modality}")
        two = modality == "image" and self.config.image.two_views
        if two or lowres is not None:
            _check_lowres(self.config, {"image": media, IMAGE_LOWRES: lowres})
        feats, grid = self.visual_features(modality, media)
        if features is not None:
            features[modality] = (feats, grid)
        if two:  # one encoder call per view (their shapes differ); one adapter call for both
            low, low_grid = self.visual_features(modality, lowres, lowres=True)
            return adapter(low, low_grid, feats, grid)
        if modality == "image":
            return adapter(feats, grid)
        n, f = media.shape[:2]
        if hasattr(adapter, "video"):
            return adapter.video(feats.reshape(n, f, *feats.shape[1:]), grid)
        out = adapter(feats, grid)  # [n*F, T, D]
        k = self.config.video.frame_pool
        if k > 1:  # [n*F, h, w, D] -> [n*F, h/k * w/k, D], each k x k block averaged
            h, w = self.config.video.adapter_config.reduced_hw(*grid)
            out = out.reshape(n * f, h // k, k, w // k, k, out.shape[-1]).mean(axis=(2, 4))
            out = out.reshape(n * f, -1, out.shape[-1])
        out = out.reshape(n, f, *out.shape[1:])  # [n, F, T, D]
        if self.config.video.frame_embed:  # frame k's tokens + the k-th frame embedding
            out = out + self.video_frame_embed[None, :, None].astype(out.dtype)
        return out.reshape(n, -1, out.shape[-1])

    def embed_inputs(self, batch: Mapping[str, Any], features: dict | None = None) -> jax.Array:
        """Token embeddings with every placeholder replaced by its media embedding
        (`features` collects the visual encoders' outputs, see encode)."""
        ids = batch["input_ids"]
        x = self.llm.embed_tokens(ids)  # [batch, seq, D]
        for m in MODALITIES:
            if batch.get(m) is None:
                continue
            if getattr(self.config, m) is None:
                raise ValueError(f"batch has {m} inputs but the model has no {m} tower")
            if batch.get("modality") is None:
                raise ValueError(f"batch has {m} inputs but no 'modality' array marking where")
            wave = batch.get(AUDIO_WAVE) if m == "audio" else None
            low = batch.get(IMAGE_LOWRES) if m == "image" else None
            rows = self.encode(m, batch[m], wave, features, low).astype(x.dtype)
            rows = rows.reshape(-1, rows.shape[-1])  # [n_items * tokens, D]
            is_m = batch["modality"] == MODALITY_CODE[m]  # [batch, seq]
            if batch.get("media_index") is not None:  # rows given by the data pipeline
                rank = batch["media_index"]
            else:  # k-th placeholder of the batch (row-major) takes row k
                rank = jnp.cumsum(is_m.reshape(-1)).reshape(is_m.shape) - 1
            picked = jnp.take(rows, jnp.clip(rank, 0, rows.shape[0] - 1), axis=0)
            x = jnp.where(is_m[..., None], picked, x)
        return x

    def __call__(self, batch: Mapping[str, Any], *, cache: dict | None = None,
                 compute_logits: bool = True) -> dict[str, Any]:
        """-> {"logits", "hidden", "cache", "inputs_embeds"} (+ "highway" [n, T, out_dim] when
        configured); inputs_embeds [batch, seq, D]: the LLM's input, media scattered in."""
        features: dict = {}
        x = self.embed_inputs(batch, features)
        out = self.llm(inputs_embeds=x, positions=batch.get("positions"),
                       segment_ids=batch.get("segment_ids"), cache=cache,
                       compute_logits=compute_logits)
        out["inputs_embeds"] = x
        if self.config.highway is not None:
            m = "image" if "image" in features else "video"
            if m in features:  # the features the LLM input used: no second encoder pass
                out["highway"] = self.highway(*features[m])
        return out
