"""Hugging Face SigLIP vision tower <-> SiglipVisionEncoder params.

Import reads a directory saved from `SiglipVisionModel` or `SiglipModel` (the vision tower is
`vision_config` / the `vision_model.` keys). Ignored on import: the text tower (`text_model.*`),
`logit_scale` / `logit_bias`, and the vision attention-pooling head (`head.*` /
`vision_model.head.*`), which omni_jax does not use (LLM adapters consume patch features).
Export writes a `SiglipVisionModel` directory with `vision_use_head: false`, so
`SiglipVisionModel.from_pretrained` loads every tensor and initializes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from omni_jax.convert.io import check_tensors, read_config, read_tensors, write_checkpoint
from omni_jax.encoders.vision import SiglipVisionConfig

# transformers' SiglipVisionConfig defaults: hub config.json files omit keys left at default.
HF_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
}
_HF_NAMES = {  # HF SiglipVisionConfig field -> SiglipVisionConfig field
    "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
    "num_channels": "num_channels", "image_size": "image_size", "patch_size": "patch_size",
    "hidden_act": "hidden_act", "layer_norm_eps": "layer_norm_eps",
}
_IGNORED = ("text_model.", "logit_scale", "logit_bias", "head.")
_PREFIX = "vision_model."

Fn = Callable[[np.ndarray], np.ndarray]
# (hf key, flax path, hf shape, hf -> flax, flax -> hf)
Entry = tuple[str, tuple[str, ...], tuple[int, ...], Fn, Fn]


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _t(x: np.ndarray) -> np.ndarray:
    return x.T


def layout(c: SiglipVisionConfig) -> list[Entry]:
    """Every tensor of the HF vision tower (keys as SiglipVisionModel saves them) and where it
    lives in the omni_jax param tree."""
    d, h, hd, m, p = c.hidden_size, c.num_heads, c.head_dim, c.intermediate_size, c.patch_size
    entries: list[Entry] = [
        ("embeddings.patch_embedding.weight", ("patch_embed", "kernel"), (d, c.num_channels, p, p),
         lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)),
        ("embeddings.patch_embedding.bias", ("patch_embed", "bias"), (d,), _same, _same),
        ("embeddings.position_embedding.weight", ("pos_embed",), (c.native_grid ** 2, d),
         _same, _same),
        ("post_layernorm.weight", ("post_norm", "scale"), (d,), _same, _same),
        ("post_layernorm.bias", ("post_norm", "bias"), (d,), _same, _same),
    ]
    for i in range(c.num_layers):
        hf, fx = f"encoder.layers.{i}.", f"layers_{i}"
        for hf_norm, fx_norm in (("layer_norm1", "attn_norm"), ("layer_norm2", "mlp_norm")):
            entries += [(f"{hf}{hf_norm}.weight", (fx, fx_norm, "scale"), (d,), _same, _same),
                        (f"{hf}{hf_norm}.bias", (fx, fx_norm, "bias"), (d,), _same, _same)]
        for name in ("q", "k", "v"):
            key = f"{hf}self_attn.{name}_proj."
            entries += [
                (key + "weight", (fx, "attn", name, "kernel"), (d, d),
                 lambda w: w.T.reshape(d, h, hd), lambda k: k.reshape(d, h * hd).T),
                (key + "bias", (fx, "attn", name, "bias"), (d,),
                 lambda b: b.reshape(h, hd), lambda b: b.reshape(h * hd))]
        entries += [
            (f"{hf}self_attn.out_proj.weight", (fx, "attn", "o", "kernel"), (d, d),
             lambda w: w.T.reshape(h, hd, d), lambda k: k.reshape(h * hd, d).T),
            (f"{hf}self_attn.out_proj.bias", (fx, "attn", "o", "bias"), (d,), _same, _same),
            (f"{hf}mlp.fc1.weight", (fx, "mlp", "fc1", "kernel"), (m, d), _t, _t),
            (f"{hf}mlp.fc1.bias", (fx, "mlp", "fc1", "bias"), (m,), _same, _same),
            (f"{hf}mlp.fc2.weight", (fx, "mlp", "fc2", "kernel"), (d, m), _t, _t),
            (f"{hf}mlp.fc2.bias", (fx, "mlp", "fc2", "bias"), (d,), _same, _same)]
    return entries


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> SiglipVisionConfig:
    """HF config dict (SiglipVisionConfig, or SiglipConfig with vision_config) -> our config;
    `overrides` set omni_jax-only fields (select_layer, use_post_layernorm, pos_interp, dtype)."""
    model_type = hf.get("model_type")
    if model_type == "siglip":
        hf = hf.get("vision_config") or {}
    elif model_type != "siglip_vision_model":
        raise ValueError(f"not a SigLIP checkpoint: model_type {model_type!r}; expected "
                         "'siglip_vision_model' or 'siglip'")
    vals = {ours: hf.get(theirs, HF_DEFAULTS[theirs]) for theirs, ours in _HF_NAMES.items()}
    return SiglipVisionConfig.from_dict({**vals, **overrides})


def config_to_hf(c: SiglipVisionConfig) -> dict[str, Any]:
    """Our config -> a SiglipVisionModel config.json dict (no pooling head)."""
    out = {theirs: getattr(c, ours) for theirs, ours in _HF_NAMES.items()}
    return {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
            "attention_dropout": 0.0, "vision_use_head": False, **out}


def import_siglip_vision(path: str, **overrides: Any) -> tuple[SiglipVisionConfig, dict]:
    """HF SigLIP directory -> (config, {"params": ...}) of numpy arrays in the stored dtypes.

    Missing, unexpected or wrong-shape tensors raise one ValueError listing them all.
    """
    config = config_from_hf(read_config(path), **overrides)
    return config, params_from_tensors(layout(config), read_tensors(path), "SigLIP vision",
                                       _IGNORED)


def params_from_tensors(entries: list[Entry], tensors: Mapping[str, np.ndarray], what: str,
                        ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """HF tensors (a leading "vision_model." dropped) -> {"params": tree} along a layout;
    missing, unexpected (outside `ignore`) or wrong-shape tensors: one ValueError."""
    tensors = {(k[len(_PREFIX):] if k.startswith(_PREFIX) else k): v for k, v in tensors.items()}
    check_tensors(tensors, {e[0]: e[2] for e in entries}, what, ignore_unexpected=ignore)
    flat = {fx: to_flax(np.asarray(tensors[hf])) for hf, fx, _, to_flax, _ in entries}
    return {"params": unflatten_dict(flat)}


def tensors_from_params(entries: list[Entry], params: Mapping[str, Any], what: str
                        ) -> dict[str, np.ndarray]:
    """{"params": tree} or the tree (boxed or not) -> HF tensors along a layout, unchanged."""
    params = nn.meta.unbox(dict(params))
    if set(params) == {"params"}:
        params = params["params"]
    flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}
    expected = {"/".join(fx): to_flax(np.empty(shape, np.int8)).shape
                for _, fx, shape, to_flax, _ in entries}
    check_tensors(flat, expected, what)
    return {hf: to_hf(flat["/".join(fx)]) for hf, fx, _, _, to_hf in entries}


def export_siglip_vision(config: SiglipVisionConfig, params: Mapping[str, Any],
                         out_dir: str) -> None:
    """Write `params` (the {"params": ...} variables or the params tree, boxed or not) as a
    directory `transformers.SiglipVisionModel.from_pretrained` loads, tensors unchanged."""
    tensors = tensors_from_params(layout(config), params, "omni_jax SigLIP vision params")
    dtype = str(tensors["embeddings.position_embedding.weight"].dtype)
    write_checkpoint(out_dir, {**config_to_hf(config), "dtype": dtype}, tensors)
