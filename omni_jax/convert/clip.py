"""Hugging Face CLIP vision tower <-> SiglipVisionEncoder params (CLIP configuration).

Import reads a directory saved from `CLIPVisionModel` (keys `vision_model.*`) or a full
`CLIPModel` (its `vision_config` and `vision_model.*` keys; the text tower,
`visual_projection`, `text_projection` and `logit_scale` are ignored), e.g. OpenOmni's
openai/clip-vit-large-patch14-336. Weights come from model.safetensors (or its shard index);
a directory holding only pytorch_model.bin is read with `torch.load(weights_only=True)`.

The imported config reproduces HF's `hidden_states[select_layer]`: class token, pre-LayerNorm,
bias-free patch conv, quick-GELU, and no post-LayerNorm (HF applies it to the pooled [CLS]
only; the tensors are kept so an export round-trips). OpenOmni / LLaVA read the penultimate
layer without [CLS]: `import_clip_vision(path, select_layer=-2)` (feature "patch" is default).
Export writes a `CLIPVisionModel` directory that `from_pretrained` loads with nothing missing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from omni_jax.convert import siglip
from omni_jax.convert.io import read_config, read_tensors, write_checkpoint
from omni_jax.encoders.vision import SiglipVisionConfig

# transformers' CLIPVisionConfig defaults: hub config.json files omit keys left at default.
HF_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
# what makes the shared ViT a CLIP tower (fixed: the checkpoint's tensors imply them)
CLIP_FIELDS: dict[str, Any] = {"class_token": True, "pre_layernorm": True, "patch_bias": False}
_DEFAULT_RUNTIME: dict[str, Any] = {"use_post_layernorm": False}
_IGNORED = ("text_model.", "visual_projection.", "text_projection.", "logit_scale",
            "embeddings.position_ids")  # old transformers saved the position_ids buffer
_PREFIX = "vision_model."
_BIN = "pytorch_model.bin"


def _same(x: np.ndarray) -> np.ndarray:
    return x


def layout(c: SiglipVisionConfig) -> list[siglip.Entry]:
    """Every tensor of the HF CLIP vision tower (keys without `vision_model.`) and where it
    lives in the omni_jax param tree: SigLIP's layout without the patch bias, plus the class
    embedding, the [CLS] position row and the pre-LayerNorm."""
    _check_clip(c)
    d = c.hidden_size
    drop = {"embeddings.patch_embedding.bias", "embeddings.position_embedding.weight"}
    return [e for e in siglip.layout(c) if e[0] not in drop] + [
        ("embeddings.class_embedding", ("class_embed",), (d,), _same, _same),
        ("embeddings.position_embedding.weight", ("pos_embed",), (c.num_positions, d),
         _same, _same),
        ("pre_layrnorm.weight", ("pre_norm", "scale"), (d,), _same, _same),
        ("pre_layrnorm.bias", ("pre_norm", "bias"), (d,), _same, _same),
    ]


def _check_clip(c: SiglipVisionConfig) -> None:
    wrong = {k: getattr(c, k) for k, v in CLIP_FIELDS.items() if getattr(c, k) != v}
    if wrong:
        raise ValueError(f"not a CLIP-shaped vision config: {wrong}; CLIP needs {CLIP_FIELDS}")


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> SiglipVisionConfig:
    """HF config dict (CLIPVisionConfig, or CLIPConfig with vision_config) -> our config;
    `overrides` set omni_jax-only fields (select_layer, feature, use_post_layernorm, ...)."""
    model_type = hf.get("model_type")
    if model_type == "clip":
        hf = hf.get("vision_config") or {}
    elif model_type != "clip_vision_model":
        raise ValueError(f"not a CLIP checkpoint: model_type {model_type!r}; expected "
                         "'clip_vision_model' or 'clip'")
    fixed = sorted(set(overrides) & set(CLIP_FIELDS))
    if fixed:
        raise ValueError(f"cannot override {fixed} on a CLIP import: the tensors fix them")
    vals = {ours: hf.get(theirs, HF_DEFAULTS[theirs]) for theirs, ours in siglip._HF_NAMES.items()}
    return SiglipVisionConfig.from_dict({**vals, **CLIP_FIELDS, **_DEFAULT_RUNTIME, **overrides})


def config_to_hf(c: SiglipVisionConfig) -> dict[str, Any]:
    """Our (CLIP-shaped) config -> a CLIPVisionModel config.json dict."""
    _check_clip(c)
    out = {theirs: getattr(c, ours) for theirs, ours in siglip._HF_NAMES.items()}
    return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
            "attention_dropout": 0.0, **out}


def _read_weights(path: str) -> dict[str, np.ndarray]:
    """safetensors via io.read_tensors; else a lone pytorch_model.bin (weights_only load)."""
    bin_file = os.path.join(path, _BIN)
    has_st = any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json")
                 for f in os.listdir(path))
    if has_st or not os.path.isfile(bin_file):
        return read_tensors(path)
    import torch

    try:
        state = torch.load(bin_file, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling / zip errors come in many types
        raise ValueError(f"{bin_file}: cannot read torch state dict ({e})") from e
    if not isinstance(state, Mapping):
        raise ValueError(f"{bin_file}: expected a state dict, got {type(state).__name__}")
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
            for k, v in state.items()}


def import_clip_vision(path: str, **overrides: Any) -> tuple[SiglipVisionConfig, dict]:
    """HF CLIP (vision) directory -> (config, {"params": ...}) of numpy arrays in the stored
    dtypes. Missing, unexpected or wrong-shape tensors raise one ValueError listing them all."""
    config = config_from_hf(read_config(path), **overrides)
    return config, siglip.params_from_tensors(layout(config), _read_weights(path),
                                              "CLIP vision", _IGNORED)


def export_clip_vision(config: SiglipVisionConfig, params: Mapping[str, Any],
                       out_dir: str) -> None:
    """Write `params` (the {"params": ...} variables or the params tree, boxed or not) as a
    directory `transformers.CLIPVisionModel.from_pretrained` loads, tensors unchanged."""
    tensors = {_PREFIX + hf: v for hf, v in siglip.tensors_from_params(
        layout(config), params, "omni_jax CLIP vision params").items()}
    dtype = str(tensors[_PREFIX + "embeddings.position_embedding.weight"].dtype)
    write_checkpoint(out_dir, {**config_to_hf(config), "dtype": dtype}, tensors)
