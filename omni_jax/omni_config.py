"""OmniConfig: which encoder and adapter each modality uses, on top of an LLMConfig.

A config dict (e.g. from omni_jax/configs/models/*.py) looks like
  {"llm": {...LLMConfig...},
   "image": {"encoder": "siglip", "encoder_config": {...}, "adapter": "mlp_2x2",
             "adapter_config": {...}, "image_size": [64, 64]},
   "video": {"encoder": "shared:image", "adapter": "mlp", "adapter_config": {...},
             "num_frames": 4, "image_size": [64, 64]},
   "audio": {"encoder": "whisper", "encoder_config": {...}, "adapter": "speech",
             "adapter_config": {...}, "num_frames": 3000},
   "highway": {...HighwayConfig...},            # any modality may be absent (text-only works)
   "speech": {...SpeechGenConfig...}}           # OpenOmni speech generator (speech out)

Ola's dual-encoder, multi-chunk audio tower instead of plain Whisper:
   "audio": {"encoder": "ola_audio",
             "encoder_config": {"whisper": {...}, "beats": {...} | None, "chunk_seconds": 30,
                                "max_chunks": 25, "align": "max"},   # OlaAudioConfig
             "adapter": "speech", "adapter_config": {...}, "num_chunks": 2}
  Each audio item is then `num_chunks` chunks: audio [n, num_chunks, n_mels, mel_frames] (+
  audio_wave [n, num_chunks, chunk_samples] when BEATs is configured); num_frames (mel frames
  per chunk) is derived from the encoder config (given, it must agree).

Ola's two image views: an image tower with "lowres_size": [h, w] (two-view adapters only:
ola_lgap) takes every image as a low-res view on an h x w canvas plus a high-res view on the
image_size canvas (both static; data.omni fits each view and pads it), batch keys
image [n, H, W, 3] and image_lowres [n, h, w, 3] (same items, same order).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

from omni_jax.config_base import check_keys
from omni_jax.llm.config import LLMConfig

MODALITIES = ("image", "video", "audio")
SHORT_CLIPS = ("repeat", "pad", "pad_front", "drop")  # TowerConfig.short_clips
MODALITY_CODE = {"text": 0, "image": 1, "video": 2, "audio": 3}  # as in data.template
# encoder name -> (module, config class, module class, modalities it can serve)
ENCODERS: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "siglip": ("omni_jax.encoders.vision", "SiglipVisionConfig", "SiglipVisionEncoder",
               ("image", "video")),
    "whisper": ("omni_jax.encoders.audio", "WhisperEncoderConfig", "WhisperEncoder", ("audio",)),
    "ola_audio": ("omni_jax.encoders.audio_path", "OlaAudioConfig", "OlaAudioEncoder", ("audio",)),
    "ovis2_vision": ("omni_jax.encoders.ovis2_vision", "Ovis2ViTConfig", "Ovis2VisionEncoder",
                     ("image",)),
}
CHUNKED_ENCODERS = ("ola_audio",)  # audio items of a static number of chunks (see num_chunks)
TWO_VIEW_ADAPTERS = ("ola_lgap",)  # image adapters taking (low-res, high-res) views per image
AUDIO_ADAPTERS = ("speech",)


def encoder_classes(name: str) -> tuple[type, type]:
    """(config class, module class) of a registered encoder."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known encoders: {', '.join(sorted(ENCODERS))}")
    mod = importlib.import_module(ENCODERS[name][0])
    return getattr(mod, ENCODERS[name][1]), getattr(mod, ENCODERS[name][2])


def adapter_classes(name: str) -> tuple[type, type, dict[str, Any]]:
    """(config class, module class, implied settings) of a registered adapter."""
    if name == "speech":
        from omni_jax.adapters.speech_projector import SpeechProjector, SpeechProjectorConfig

        return SpeechProjectorConfig, SpeechProjector, {}
    from omni_jax.adapters.registry import ADAPTERS, known_adapters

    if name not in ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; known adapters: "
                         f"{', '.join(known_adapters() + AUDIO_ADAPTERS)}")
    return ADAPTERS[name]


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """One modality's front end: encoder (or 'shared:<modality>') + adapter + static input shape."""

    modality: str
    encoder: str
    adapter: str
    encoder_config: Any = None  # encoder's config dataclass (None when shared)
    adapter_config: Any = None  # adapter's config dataclass
    image_size: tuple[int, int] | None = None  # (height, width) for image / video
    num_frames: int | None = None  # video frames per item, or mel frames per audio item/chunk
    num_chunks: int | None = None  # chunked audio encoders only: chunks per item (static)
    # image towers: Capybara's any-res tiling, each image -> its best grid of up to max_tiles
    # image_size tiles + a thumbnail, every view one item of the static shape (0: one view)
    max_tiles: int = 0
    # image towers: Ola's two views, the low-res canvas (height, width); image_size is then the
    # high-res canvas. None: one view per image at image_size
    lowres_size: tuple[int, int] | None = None
    # video towers: a clip with fewer than num_frames frames has its frames "repeat"ed by the
    # uniform sampling rule (data.features.video.sample_indices), or is "pad"ded with blank
    # frames (zero pixels after normalisation) at the end, or before it ("pad_front": its last
    # frame stays in the last slot), so how many frames it had stays visible; or "drop": padded
    # after the clip for the tower (static shape) but only its own frames' tokens enter the
    # LLM's sequence (a variable number of video tokens per clip; the batch's media_index
    # maps them). "drop" needs per-frame tokens (not ola_lgap, which pools the frames itself)
    short_clips: str = "repeat"
    # video towers: each frame's adapter tokens average-pooled over k x k blocks of its grid
    # (LLaVA-NeXT-Video's spatial pooling of frames, avg mode); 1 = off. Needs an adapter whose
    # tokens are a plain grid (an "mlp" projector without newlines) divisible by k
    frame_pool: int = 1
    # video towers: a learned embedding per frame slot added to that frame's tokens after the
    # adapter (Video-LLaMA's frame position embedding), zero-initialised so a video adapter
    # started from the image one begins as it. False = off. Not for adapters that pool the
    # frames themselves (ola_lgap)
    frame_embed: bool = False

    def __post_init__(self) -> None:
        where = f"{self.modality} tower"
        if not isinstance(self.frame_pool, int) or self.frame_pool < 1 or (
                self.frame_pool > 1 and self.modality != "video"):
            raise ValueError(f"{where}: frame_pool must be an int >= 1 (> 1 on a video tower "
                             f"only), got {self.frame_pool!r}")
        if self.short_clips not in SHORT_CLIPS or (self.short_clips != "repeat"
                                                   and self.modality != "video"):
            raise ValueError(f"{where}: short_clips must be one of {SHORT_CLIPS} (a video tower "
                             f"only for other than 'repeat'), got {self.short_clips!r}")
        if not isinstance(self.frame_embed, bool) or (self.frame_embed
                                                      and self.modality != "video"):
            raise ValueError(f"{where}: frame_embed must be a bool (True on a video tower only), "
                             f"got {self.frame_embed!r}")
        if self.max_tiles and (self.modality != "image" or self.max_tiles < 1):
            raise ValueError(f"{where}: max_tiles must be >= 1 on an image tower (0 = off), got "
                             f"{self.max_tiles!r} on {self.modality}")
        if self.lowres_size is not None:
            self._check_lowres(where)
        if self.encoder not in CHUNKED_ENCODERS:
            if self.num_chunks is not None:
                raise ValueError(f"{where}: num_chunks is only for the chunked audio encoders "
                                 f"{CHUNKED_ENCODERS}, not {self.encoder!r} (one window per item)")
            return
        c = self.encoder_config
        if self.num_chunks is None or not 1 <= self.num_chunks <= c.max_chunks:
            raise ValueError(f"{where}: encoder {self.encoder!r} needs num_chunks (chunks per "
                             f"item) in [1, max_chunks={c.max_chunks}], got {self.num_chunks!r}")
        if self.num_frames != c.mel_frames:
            raise ValueError(f"{where}: num_frames={self.num_frames} but a "
                             f"{c.chunk_seconds} s chunk gives {c.mel_frames} mel frames; omit "
                             f"num_frames or make them agree")
        if c.mask_padding:
            raise ValueError(f"{where}: mask_padding=True is not supported here (the batch "
                             f"carries no per-chunk lengths; short items are padded with silence "
                             f"chunks); set mask_padding=False")

    def _check_lowres(self, where: str) -> None:
        size = self.lowres_size
        if self.modality != "image" or self.max_tiles:
            raise ValueError(f"{where}: lowres_size (Ola's low-res view) is only for an image "
                             f"tower without max_tiles, got it on {self.modality} with "
                             f"max_tiles={self.max_tiles}")
        if self.adapter not in TWO_VIEW_ADAPTERS:
            raise ValueError(f"{where}: lowres_size needs a two-view adapter "
                             f"{TWO_VIEW_ADAPTERS}, got {self.adapter!r}")
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"{where}: lowres_size must be (height, width) > 0, got {size!r}")

    @property
    def two_views(self) -> bool:
        """Ola's low-res + high-res views per image (lowres_size set)."""
        return self.lowres_size is not None

    @property
    def audio_dim(self) -> int:
        """Channels the audio adapter sees (Whisper width, + BEATs width for ola_audio)."""
        c = self.encoder_config
        return c.out_dim if self.encoder in CHUNKED_ENCODERS else c.d_model

    @property
    def shared_with(self) -> str | None:
        return self.encoder.split(":", 1)[1] if self.encoder.startswith("shared:") else None

    @classmethod
    def from_dict(cls, modality: str, d: Mapping[str, Any]) -> TowerConfig:
        d = dict(d)
        check_keys(f"{modality} tower", d, ("encoder", "encoder_config", "adapter",
                                            "adapter_config", "image_size", "num_frames",
                                            "num_chunks", "max_tiles", "lowres_size",
                                            "short_clips", "frame_pool", "frame_embed"))
        for key in ("encoder", "adapter"):
            if not d.get(key):
                raise ValueError(f"{modality} tower: '{key}' is required")
        enc, enc_cfg = d["encoder"], None
        if not enc.startswith("shared:"):
            cfg_cls, _ = encoder_classes(enc)
            if modality not in ENCODERS[enc][3]:
                raise ValueError(f"{modality} tower: encoder {enc!r} serves "
                                 f"{ENCODERS[enc][3]}, not {modality!r}")
            raw = d.get("encoder_config") or {}
            raw = raw.to_dict() if hasattr(raw, "to_dict") else raw  # ConfigDict: nested dicts
            enc_cfg = cfg_cls.from_dict(raw)
        a_cfg_cls, _, fixed = adapter_classes(d["adapter"])
        a_cfg = dict(d.get("adapter_config") or {})
        for key, value in fixed.items():
            a_cfg.setdefault(key, value)
        size, low = d.get("image_size"), d.get("lowres_size")
        frames, chunks = d.get("num_frames"), d.get("num_chunks")
        if enc in CHUNKED_ENCODERS and frames is None:
            frames = enc_cfg.mel_frames
        return cls(modality, enc, d["adapter"], enc_cfg, a_cfg_cls.from_dict(a_cfg),
                   None if size is None else (int(size[0]), int(size[1])),
                   None if frames is None else int(frames),
                   None if chunks is None else int(chunks), int(d.get("max_tiles") or 0),
                   None if low is None else tuple(int(x) for x in low),
                   str(d.get("short_clips") or "repeat"), d.get("frame_pool", 1),
                   d.get("frame_embed", False))


@dataclasses.dataclass(frozen=True)
class OmniConfig:
    """The LLM plus any subset of image / video / audio towers and an optional X-VILA highway."""

    llm: LLMConfig
    image: TowerConfig | None = None
    video: TowerConfig | None = None
    audio: TowerConfig | None = None
    highway: Any = None  # adapters.highway.HighwayConfig
    speech: Any = None  # speech.config.SpeechGenConfig: the speech-unit generator (speech out)

    def __post_init__(self) -> None:
        for m in MODALITIES:
            t = getattr(self, m)
            if t is None:
                continue
            out_dim = getattr(t.adapter_config, "out_dim", None)
            if out_dim != self.llm.hidden_size:
                raise ValueError(f"{m} adapter out_dim={out_dim} must equal the LLM hidden_size="
                                 f"{self.llm.hidden_size}")
            src = t.shared_with
            if src is not None and (src not in MODALITIES or getattr(self, src) is None
                                    or getattr(self, src).shared_with is not None):
                raise ValueError(f"{m} tower shares the encoder of {src!r}, which is not a "
                                 f"configured tower with its own encoder")
            if m in ("image", "video") and t.image_size is None:
                raise ValueError(f"{m} tower needs image_size [height, width]")
            if m in ("video", "audio") and not t.num_frames:
                raise ValueError(f"{m} tower needs num_frames > 0")
            in_dim = getattr(t.adapter_config, "in_dim", None)
            if m == "audio" and t.shared_with is None and in_dim is not None \
                    and in_dim != t.audio_dim:
                raise ValueError(f"audio adapter in_dim={in_dim} must equal the {t.encoder} "
                                 f"encoder's output channels {t.audio_dim}")
        if self.video is not None and self.video.frame_pool > 1:
            self._check_frame_pool()
        if self.video is not None and self.video.frame_embed and hasattr(
                adapter_classes(self.video.adapter)[1], "video"):
            raise ValueError(f"video tower: frame_embed needs an adapter that embeds each frame "
                             f"on its own; {self.video.adapter!r} pools the frames itself")
        if self.video is not None and self.video.short_clips == "drop" and hasattr(
                adapter_classes(self.video.adapter)[1], "video"):
            raise ValueError(f"video tower: short_clips='drop' needs an adapter that embeds each "
                             f"frame on its own; {self.video.adapter!r} pools the frames itself "
                             f"(use 'pad')")
        if self.highway is not None and self.image is None and self.video is None:
            raise ValueError("the visual highway needs an image or video tower")
        if self.speech is not None:
            from omni_jax.speech.config import check_width

            # token ids are checked against the tokenizer when data is encoded: a generator
            # table may be smaller than the LLM's padded one (OpenOmni's 0.5B-shaped one is)
            check_width(self.speech, self.llm)

    def _check_frame_pool(self) -> None:
        t, k = self.video, self.video.frame_pool
        a = t.adapter_config
        if not hasattr(a, "reduced_hw") or getattr(a, "newline", "none") != "none":
            raise ValueError(f"video tower: frame_pool={k} needs an adapter whose tokens are a "
                             f"plain grid (an 'mlp' projector with newline='none'), got "
                             f"{t.adapter!r}")
        h, w = a.reduced_hw(*self.encoder_config("video").grid(*t.image_size))
        if h % k or w % k:
            raise ValueError(f"video tower: frame_pool={k} must divide the frame's token grid "
                             f"{h}x{w}")

    def encoder_config(self, modality: str) -> Any:
        t = getattr(self, modality)
        return getattr(self, t.shared_with).encoder_config if t.shared_with else t.encoder_config

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OmniConfig:
        d = dict(d)
        unknown = sorted(set(d) - {"llm", "highway", "speech", *MODALITIES})
        if unknown:
            raise ValueError(f"OmniConfig: unknown keys {unknown}; expected llm, highway, "
                             f"speech, {', '.join(MODALITIES)}")
        if "llm" not in d:
            raise ValueError("OmniConfig: 'llm' is required")
        towers = {m: TowerConfig.from_dict(m, d[m]) for m in MODALITIES if d.get(m)}
        highway = None
        if d.get("highway"):
            from omni_jax.adapters.highway import HighwayConfig

            highway = HighwayConfig.from_dict(d["highway"])
        speech = None
        if d.get("speech"):
            from omni_jax.speech.config import SpeechGenConfig

            speech = SpeechGenConfig.from_dict(d["speech"])
        return cls(LLMConfig.from_dict(d["llm"]), highway=highway, speech=speech, **towers)
