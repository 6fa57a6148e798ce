"""Ola's released checkpoint -> the `ola`-flavoured OmniModel (OmniConfig, params) + native IO.

Input (SEEDS.md "Ola's released checkpoint"): an OlaQwenForCausalLM directory (config.json with
model_type `ola_qwen`, `mm_projector_type` `ola_mlp`, `speech_encoder_type` `dual`, ...; sharded
safetensors) plus the two speech-encoder files Ola rebuilds at inference: OpenAI Whisper
(`large-v3.pt`, via whisper_openai.import_whisper_pt) and unilm BEATs (via beats.import_beats).
Key mapping:
  model.embed_tokens / model.layers.{i} / model.norm / lm_head -> llm (convert.qwen2)
  model.vision_tower.vision_tower.* (Oryx-ViT, timm names)     -> image_encoder (SigLIP-style:
      fused attn.qkv rows q | k | v split; 128 x 128 pos grid kept, resized bilinearly per image;
      exact GELU, LayerNorm eps 1e-6, no post-LN: its unused post_norm is filled with 1 / 0)
  model.mm_projector.{proj1,proj2,pooler.predictor.0/.2,image_*} -> image_adapter (ola_lgap)
      (and video_adapter, the same weights, when a video tower is asked for)
  model.speech_projector.{linear1,linear2,speech_*}  -> audio_adapter (speech, k = ds_rate)
  Whisper .pt + BEATs .pt                                      -> audio_encoder (ola_audio)
`model.speech_encoder.*` in the shards is ignored (Ola's code overwrites it from the .pt files).
The ViT's head count is not in the files: `vision_heads` (Oryx-ViT: 16). The model's static
media shapes (image size, audio chunks per item, video frames) are import options.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from omni_jax.convert import io, qwen2
from omni_jax.convert.beats import import_beats
from omni_jax.convert.tree import flatten, unflatten
from omni_jax.convert.whisper_openai import import_whisper_pt
from omni_jax.encoders.vision import SiglipVisionConfig
from omni_jax.omni_config import MODALITIES, OmniConfig
from omni_jax.utils import fs

NATIVE_KIND = "ola"
NATIVE_META = "omni_jax.json"  # registry.save_native's layout: meta json + orbax params/
VIT, PROJ, SPEECH = "model.vision_tower.vision_tower.", "model.mm_projector.", \
    "model.speech_projector."
LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.",
                "model.rotary_emb.")
IGNORED = ("model.speech_encoder.",)  # rebuilt from the .pt files at inference (Ola's code)
VIT_UNUSED = ("attn_pool.", "head.", "fc_norm.")  # timm pooling head: not in the feature path
# config.json field -> the only value this importer implements
REQUIRED = {"model_type": "ola_qwen", "mm_projector_type": "ola_mlp",
            "speech_encoder_type": "dual", "speech_projector_type": "linear"}
SAMPLE_RATE, MEL_HOP = 16000, 160
LN_EPS = 1e-6  # Oryx-ViT LayerNorm eps


def check_ola_config(hf: Mapping[str, Any]) -> None:
    """ValueError for an Ola config.json this importer does not implement (one per setting)."""
    for key, want in REQUIRED.items():
        if hf.get(key) != want:
            raise ValueError(f"Ola config.json: {key}={hf.get(key)!r} is not supported; "
                             f"expected {want!r} (Ola's released checkpoint)")
    if hf.get("mm_vision_select_layer", -1) != -1:
        raise ValueError(f"Ola config.json: mm_vision_select_layer="
                         f"{hf['mm_vision_select_layer']!r} is not supported; expected -1")
    for key in ("mm_hidden_size", "speech_encoder_hidden_size", "speech_encoder_ds_rate",
                "hidden_size"):
        v = hf.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"Ola config.json: {key} must be a positive int, got {v!r}")


def _split(tensors: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """State dict -> {llm, vit, proj, speech} parts (prefixes stripped but the LLM's)."""
    parts: dict[str, dict[str, np.ndarray]] = {"llm": {}, "vit": {}, "proj": {}, "speech": {}}
    unknown = []
    for k, v in tensors.items():
        if k.startswith(LLM_PREFIXES):
            parts["llm"][k] = v
        elif k.startswith(IGNORED):
            continue
        else:
            for part, prefix in (("vit", VIT), ("proj", PROJ), ("speech", SPEECH)):
                if k.startswith(prefix):
                    parts[part][k[len(prefix):]] = v
                    break
            else:
                unknown.append(k)
    if unknown:
        raise ValueError(f"Ola checkpoint: unexpected keys {sorted(unknown)[:8]} (expected the "
                         f"LLM's, {VIT}*, {PROJ}*, {SPEECH}*, {IGNORED[0]}*)")
    for part, prefix in (("vit", VIT), ("proj", PROJ), ("speech", SPEECH)):
        if not parts[part]:
            raise ValueError(f"Ola checkpoint: no {prefix}* tensors; expected the {part} tower")
    return parts


def _f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32)


def _need(t: Mapping[str, np.ndarray], key: str, what: str, rank: int) -> np.ndarray:
    if key not in t or np.ndim(t[key]) != rank:
        got = None if key not in t else tuple(np.shape(t[key]))
        raise ValueError(f"Ola {what}: missing or malformed {key!r} (expected rank {rank}, "
                         f"got {got})")
    return t[key]


def vision_from_oryx(t: Mapping[str, np.ndarray], heads: int = 16
                     ) -> tuple[SiglipVisionConfig, dict[str, Any]]:
    """Oryx-ViT tensors (keys without model.vision_tower.vision_tower.) -> (config, tree)."""
    what = f"vision tower ({VIT}*)"
    w = _need(t, "patch_embed.proj.weight", what, 4)  # [C, 3, p, p]
    width, chans, p = w.shape[0], w.shape[1], w.shape[2]
    n = _need(t, "pos_embed", what, 3).shape[1]
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ValueError(f"Ola {what}: pos_embed has {n} rows, not a square grid (Oryx: 128^2)")
    blocks = {int(m.group(1)) for k in t if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise ValueError(f"Ola {what}: no blocks.{{i}}.* tensors")
    mlp = _need(t, "blocks.0.mlp.fc1.weight", what, 2).shape[0]
    if heads <= 0 or width % heads:
        raise ValueError(f"Ola vision tower: width {width} is not divisible by vision_heads="
                         f"{heads}; pass the ViT's head count (Oryx-ViT: 16)")
    config = SiglipVisionConfig(
        hidden_size=width, intermediate_size=mlp, num_layers=max(blocks) + 1, num_heads=heads,
        num_channels=chans, image_size=grid * p, patch_size=p, layer_norm_eps=LN_EPS,
        hidden_act="gelu", select_layer=-1, use_post_layernorm=False, pos_interp="bilinear")
    d, hd = width, config.head_dim
    shapes = {"patch_embed.proj.weight": (d, chans, p, p), "patch_embed.proj.bias": (d,),
              "pos_embed": (1, grid * grid, d)}
    for i in range(config.num_layers):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "norm2.weight": (d,),
                       b + "norm2.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                       b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d),
                       b + "attn.proj.bias": (d,), b + "mlp.fc1.weight": (mlp, d),
                       b + "mlp.fc1.bias": (mlp,), b + "mlp.fc2.weight": (d, mlp),
                       b + "mlp.fc2.bias": (d,)})
    io.check_tensors(t, shapes, f"Ola {what}", ignore_unexpected=VIT_UNUSED)
    f = {k: _f32(v) for k, v in t.items() if k in shapes}
    flat = {"patch_embed/kernel": f["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
            "patch_embed/bias": f["patch_embed.proj.bias"], "pos_embed": f["pos_embed"][0],
            "post_norm/scale": np.ones(d, np.float32), "post_norm/bias": np.zeros(d, np.float32)}
    for i in range(config.num_layers):
        b, q = f"blocks.{i}.", f"layers_{i}/"
        qkv_w, qkv_b = f[b + "attn.qkv.weight"], f[b + "attn.qkv.bias"]
        for j, name in enumerate("qkv"):  # rows q | k | v, each head-major
            flat[q + f"attn/{name}/kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, heads, hd)
            flat[q + f"attn/{name}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(heads, hd)
        flat[q + "attn/o/kernel"] = f[b + "attn.proj.weight"].T.reshape(heads, hd, d)
        flat[q + "attn/o/bias"] = f[b + "attn.proj.bias"]
        for ours, theirs in (("attn_norm", "norm1"), ("mlp_norm", "norm2")):
            flat[q + f"{ours}/scale"] = f[b + f"{theirs}.weight"]
            flat[q + f"{ours}/bias"] = f[b + f"{theirs}.bias"]
        for fc in ("fc1", "fc2"):
            flat[q + f"mlp/{fc}/kernel"] = f[b + f"mlp.{fc}.weight"].T
            flat[q + f"mlp/{fc}/bias"] = f[b + f"mlp.{fc}.bias"]
    return config, unflatten(flat)


def _linear(f: Mapping[str, np.ndarray], key: str) -> dict[str, np.ndarray]:
    return {"kernel": f[key + ".weight"].T, "bias": f[key + ".bias"]}


def projector_from_ola(t: Mapping[str, np.ndarray], vis_dim: int, width: int) -> dict[str, Any]:
    """model.mm_projector.* (ola_mlp) -> the ola_lgap adapter tree."""
    d = width
    shapes = {"proj1.weight": (d, vis_dim), "proj1.bias": (d,), "proj2.weight": (d, d),
              "proj2.bias": (d,), "pooler.predictor.0.weight": (d, 2 * d),
              "pooler.predictor.0.bias": (d,), "pooler.predictor.2.weight": (d, d),
              "pooler.predictor.2.bias": (d,),
              **{f"image_{v}": (d,) for v in ("newline", "begin", "end", "sep")}}
    io.check_tensors(t, shapes, f"Ola ola_mlp projector ({PROJ}*)")
    f = {k: _f32(v) for k, v in t.items()}
    return {"proj1": _linear(f, "proj1"), "proj2": _linear(f, "proj2"),
            "pooler": {"w1": _linear(f, "pooler.predictor.0"),
                       "w2": _linear(f, "pooler.predictor.2")},
            "vectors": {f"image_{v}": f[f"image_{v}"] for v in ("begin", "sep", "newline", "end")}}


def speech_projector_from_ola(t: Mapping[str, np.ndarray], in_dim: int, stack: int,
                              width: int) -> tuple[int, dict[str, Any]]:
    """model.speech_projector.* -> (hidden width, speech adapter tree)."""
    hidden = _need(t, "linear1.weight", f"speech projector ({SPEECH}*)", 2).shape[0]
    shapes = {"linear1.weight": (hidden, in_dim * stack), "linear1.bias": (hidden,),
              "linear2.weight": (width, hidden), "linear2.bias": (width,),
              **{f"speech_{v}": (width,) for v in ("newline", "begin", "end")}}
    io.check_tensors(t, shapes, f"Ola speech projector ({SPEECH}*; in = "
                     f"speech_encoder_hidden_size {in_dim} x ds_rate {stack})")
    f = {k: _f32(v) for k, v in t.items()}
    tree = {"linear1": _linear(f, "linear1"), "linear2": _linear(f, "linear2"),
            **{f"speech_{v}": f[f"speech_{v}"] for v in ("begin", "newline", "end")}}
    return hidden, tree


def model_dict(llm: Any, vit: SiglipVisionConfig, whisper: Any, beats: Any, *,
               speech_hidden: int, stack: int, image_size: Sequence[int], num_chunks: int,
               video_frames: int | None = None, video_size: Sequence[int] | None = None
               ) -> dict[str, Any]:
    """The OmniConfig.from_dict dict of the `ola` flavour at these sizes (cf. configs.common
    towers("ola")): speech remainder "drop" as Ola's projector; chunk length from Whisper's
    context (large-v3: 1500 positions = 30 s)."""
    width = llm.hidden_size
    lgap = {"out_dim": width}
    out: dict[str, Any] = {"llm": llm.to_dict()}
    out["image"] = {"encoder": "siglip", "encoder_config": vit.to_dict(), "adapter": "ola_lgap",
                    "adapter_config": dict(lgap), "image_size": [int(s) for s in image_size]}
    if video_frames:
        out["video"] = {"encoder": "shared:image", "adapter": "ola_lgap",
                        "adapter_config": dict(lgap), "num_frames": int(video_frames),
                        "image_size": [int(s) for s in (video_size or image_size)]}
    seconds = whisper.max_frames * MEL_HOP / SAMPLE_RATE
    out["audio"] = {"encoder": "ola_audio", "adapter": "speech", "num_chunks": int(num_chunks),
                    "encoder_config": {"whisper": whisper.to_dict(), "beats": beats.to_dict(),
                                       "sample_rate": SAMPLE_RATE, "chunk_seconds": seconds,
                                       "mel_hop_length": MEL_HOP, "align": "max"},
                    "adapter_config": {"in_dim": whisper.d_model + beats.encoder_embed_dim,
                                       "out_dim": width, "hidden_dim": speech_hidden,
                                       "stack": stack, "remainder": "drop",
                                       "special_vectors": True}}
    return out


def _check_tree(config: OmniConfig, params: dict[str, Any]) -> None:
    """The converted tree must be exactly OmniModel(config)'s (names and shapes)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from omni_jax.model import OmniModel, media_shapes

    batch: dict[str, Any] = {"input_ids": jax.ShapeDtypeStruct((1, 4), jnp.int32),
                             "modality": jax.ShapeDtypeStruct((1, 4), jnp.int32)}
    for key, shape in media_shapes(config).items():
        batch[key] = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    want = jax.eval_shape(OmniModel(config).init, jax.random.key(0), batch)
    want = {k: tuple(v.shape) for k, v in flatten(nn.meta.unbox(want)["params"]).items()}
    got = {k: tuple(np.shape(v)) for k, v in flatten(params["params"]).items()}
    if want != got:
        bad = sorted(set(want) ^ set(got)) + sorted(k for k in set(want) & set(got)
                                                    if want[k] != got[k])
        raise ValueError(f"Ola import: converted params do not match OmniModel's tree at "
                         f"{bad[:8]}")


def import_ola(ckpt_dir: str, whisper_pt: str, beats_pt: str, *,
               image_size: Sequence[int] = (384, 384), num_chunks: int = 1,
               video_frames: int | None = None, video_size: Sequence[int] | None = None,
               vision_heads: int = 16, scan_layers: bool = False
               ) -> tuple[OmniConfig, dict[str, Any], dict[str, Any]]:
    """Ola directory + Whisper .pt + BEATs .pt -> (OmniConfig, {"params": ...}, config.json)."""
    hf = io.read_config(ckpt_dir)
    check_ola_config(hf)
    parts = _split(io.read_tensors(ckpt_dir))
    llm_cfg = qwen2.config_from_hf({**hf, "model_type": "qwen2"}, scan_layers=scan_layers)
    if llm_cfg.hidden_size != hf["hidden_size"]:
        raise ValueError("Ola config.json: inconsistent hidden_size")
    vit_cfg, vit = vision_from_oryx(parts["vit"], vision_heads)
    if vit_cfg.hidden_size != hf["mm_hidden_size"]:
        raise ValueError(f"Ola checkpoint: the ViT is {vit_cfg.hidden_size} wide but config.json "
                         f"mm_hidden_size={hf['mm_hidden_size']}")
    beats_cfg, beats = import_beats(beats_pt)
    whisper_cfg, whisper = import_whisper_pt(whisper_pt)
    enc_dim, stack = hf["speech_encoder_hidden_size"], hf["speech_encoder_ds_rate"]
    if whisper_cfg.d_model + beats_cfg.encoder_embed_dim != enc_dim:
        raise ValueError(
            f"{whisper_pt}: Whisper n_audio_state={whisper_cfg.d_model} + BEATs width "
            f"{beats_cfg.encoder_embed_dim} = {whisper_cfg.d_model + beats_cfg.encoder_embed_dim}"
            f" channels, but config.json speech_encoder_hidden_size={enc_dim} implies a Whisper "
            f"of width {enc_dim - beats_cfg.encoder_embed_dim} (large-v3: 1280 + 768 = 2048)")
    width = llm_cfg.hidden_size
    hidden, speech = speech_projector_from_ola(parts["speech"], enc_dim, stack, width)
    proj = projector_from_ola(parts["proj"], vit_cfg.hidden_size, width)
    d = model_dict(llm_cfg, vit_cfg, whisper_cfg, beats_cfg, speech_hidden=hidden, stack=stack,
                   image_size=image_size, num_chunks=num_chunks, video_frames=video_frames,
                   video_size=video_size)
    config = OmniConfig.from_dict(d)
    tree = {"llm": qwen2.params_from_hf(llm_cfg, parts["llm"])["params"], "image_encoder": vit,
            "image_adapter": proj, "audio_adapter": speech,
            "audio_encoder": {"whisper": _np(whisper["params"]), "beats": _np(beats["params"])}}
    if config.video is not None:
        tree["video_adapter"] = proj  # Ola's one mm_projector serves images and video
    params = {"params": tree}
    _check_tree(config, params)
    return config, params, hf


def _np(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _np(v) for k, v in tree.items()}
    return np.asarray(tree)


def config_dict(config: OmniConfig) -> dict[str, Any]:
    """OmniConfig -> the plain dict OmniConfig.from_dict reads back (JSON-serializable)."""
    out: dict[str, Any] = {"llm": config.llm.to_dict()}
    for m in MODALITIES:
        t = getattr(config, m)
        if t is None:
            continue
        d: dict[str, Any] = {"encoder": t.encoder, "adapter": t.adapter,
                             "adapter_config": t.adapter_config.to_dict()}
        if t.encoder_config is not None:
            d["encoder_config"] = t.encoder_config.to_dict()
        for key in ("image_size", "num_frames", "num_chunks"):
            if getattr(t, key) is not None:
                d[key] = getattr(t, key)
        out[m] = d
    for key in ("highway", "speech"):
        if getattr(config, key) is not None:
            out[key] = getattr(config, key).to_dict()
    return json.loads(json.dumps(out))  # tuples -> lists, as the file will hold


def save_ola(out_dir: str, config: OmniConfig, params: dict[str, Any],
             hf_config: Mapping[str, Any] | None = None) -> None:
    """Native checkpoint: omni_jax.json {"kind": "ola", "config", "hf_config"} + orbax params/."""
    import orbax.checkpoint as ocp

    out_dir = fs.abspath(out_dir)
    fs.makedirs(out_dir)
    meta = {"kind": NATIVE_KIND, "config": config_dict(config), "hf_config": dict(hf_config or {})}
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(fs.join(out_dir, "params"), _np(params), force=True)
    fs.write_text(fs.join(out_dir, NATIVE_META), json.dumps(meta, indent=2))  # last: complete


def load_ola(path: str) -> tuple[OmniConfig, dict[str, Any]]:
    """Read a native `ola` checkpoint -> (OmniConfig, {"params": ...})."""
    from omni_jax.convert.registry import read_native

    meta, params = read_native(path, NATIVE_KIND)
    return OmniConfig.from_dict(meta["config"]), _np(params)
