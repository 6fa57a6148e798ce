"""transformers Ovis2ForConditionalGeneration directories <-> (OmniConfig dict, OmniModel params).

Import maps the whole model onto an OmniModel with one image tower:
  model.vision_tower.transformer.*   -> params["image_encoder"] (encoders.ovis2_vision)
  model.vision_tower.head_linear/norm, model.visual_embeddings_table
                                     -> params["image_adapter"] (adapters.ovis2_vte: head with
                                        the hidden-stride merge, VTE, indicator rows)
  model.language_model.*, lm_head    -> params["llm"] (through convert.qwen2)
The returned config is a dict in OmniConfig.from_dict's format (encoder "ovis2_vision", adapter
"ovis2_vte"). Ovis2Config's top-level tie_word_embeddings decides whether lm_head is the token
table (transformers ties on it, not on text_config's); an untied lm_head must have the text
vocabulary's rows. Tensors are read as float32; export writes float32 unless `dtype` (or the
base config's "dtype") says otherwise, and restores fields we do not model from `base_config`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from omni_jax.adapters.ovis2_vte import Ovis2VTEConfig
from omni_jax.convert import io, qwen2
from omni_jax.convert.tree import flatten, unflatten
from omni_jax.encoders.ovis2_vision import Ovis2ViTConfig
from omni_jax.llm.config import LLMConfig

ENCODER, ADAPTER = "ovis2_vision", "ovis2_vte"  # OmniConfig registry names (see the report)
VISION = "model.vision_tower."
VIT = VISION + "transformer."
VTE_KEY = "model.visual_embeddings_table.weight"
LLM_PREFIX = "model.language_model."
# transformers' Ovis2VisionConfig / Ovis2Config defaults (config.json omits keys at default)
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24,
    "num_attention_heads": 8, "num_channels": 3, "image_size": 224, "patch_size": 14,
    "rms_norm_eps": 1e-5, "qkv_bias": False, "mlp_bias": False, "hidden_act": "silu",
    "vocab_size": 16384, "hidden_stride": 1, "num_visual_indicator_tokens": 5,
    "initializer_range": 0.02, "tokenize_function": "softmax"}
TOP_DEFAULTS: dict[str, Any] = {
    "image_token_id": 151665, "visual_indicator_token_ids": [151666, 151667, 151668, 151669,
                                                             151670],
    "tie_word_embeddings": True}
_VIT_NAMES = {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
              "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
              "num_channels": "num_channels", "image_size": "image_size",
              "patch_size": "patch_size", "rms_norm_eps": "rms_norm_eps", "qkv_bias": "qkv_bias",
              "mlp_bias": "mlp_bias", "hidden_act": "hidden_act",
              "initializer_range": "initializer_range"}

Fn = Callable[[np.ndarray], np.ndarray]
Entry = tuple[str, str, tuple[int, ...], Fn, Fn]  # hf key, our "/" path, hf shape, to us, to hf


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _t(x: np.ndarray) -> np.ndarray:
    return x.T


def vision_layout(vit: Ovis2ViTConfig, vte: Ovis2VTEConfig) -> list[Entry]:
    """Every vision-side tensor (HF key, path under the OmniModel params, HF shape, maps)."""
    d, h, hd, m, p = vit.hidden_size, vit.num_heads, vit.head_dim, vit.intermediate_size, \
        vit.patch_size
    e, a = "image_encoder/", "image_adapter/"
    s = vte.hidden_stride
    out: list[Entry] = [
        (VIT + "embeddings.patch_embedding.weight", e + "patch_embed/kernel",
         (d, vit.num_channels, p, p), lambda w: w.transpose(2, 3, 1, 0),
         lambda k: k.transpose(3, 2, 0, 1)),
        (VIT + "embeddings.patch_embedding.bias", e + "patch_embed/bias", (d,), _same, _same),
        (VIT + "embeddings.position_embedding.weight", e + "pos_embed", (vit.native_grid ** 2, d),
         _same, _same),
        (VIT + "embeddings.rms_norm.weight", e + "patch_norm/scale", (d,), _same, _same),
        (VIT + "rms_norm.weight", e + "post_norm/scale", (d,), _same, _same),
        (VISION + "head_linear.weight", a + "head_linear/kernel", (vte.head_size, d * s * s),
         _t, _t),
        (VISION + "head_norm.weight", a + "head_norm/scale", (vte.head_size,), _same, _same),
        (VISION + "head_norm.bias", a + "head_norm/bias", (vte.head_size,), _same, _same),
        (VTE_KEY, a + "vte/embedding", (vte.vocab_size, vte.out_dim), _same, _same)]
    for i in range(vit.num_layers):
        hf, fx = f"{VIT}encoder.layers.{i}.", f"{e}layers_{i}/"
        out += [(hf + "rms_norm1.weight", fx + "attn_norm/scale", (d,), _same, _same),
                (hf + "rms_norm2.weight", fx + "mlp_norm/scale", (d,), _same, _same),
                (hf + "attention.out_proj.weight", fx + "attn/o/kernel", (d, d),
                 lambda w: w.T.reshape(h, hd, d), lambda k: k.reshape(h * hd, d).T)]
        for n in ("q", "k", "v"):
            out.append((hf + f"attention.{n}_proj.weight", fx + f"attn/{n}/kernel", (d, d),
                        lambda w: w.T.reshape(d, h, hd), lambda k: k.reshape(d, h * hd).T))
            if vit.qkv_bias:
                out.append((hf + f"attention.{n}_proj.bias", fx + f"attn/{n}/bias", (d,),
                            lambda b: b.reshape(h, hd), lambda b: b.reshape(h * hd)))
        if vit.qkv_bias:
            out.append((hf + "attention.out_proj.bias", fx + "attn/o/bias", (d,), _same, _same))
        for n, shape in (("gate", (m, d)), ("up", (m, d)), ("down", (d, m))):
            out.append((hf + f"ffn.{n}_proj.weight", fx + f"mlp/{n}/kernel", shape, _t, _t))
            if vit.mlp_bias:
                out.append((hf + f"ffn.{n}_proj.bias", fx + f"mlp/{n}/bias", shape[:1],
                            _same, _same))
    return out


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"Ovis2 vision_config.{what} must be one int (square images), got {v!r}")
    return v


def config_from_hf(hf: Mapping[str, Any], **llm_overrides: Any) -> dict[str, Any]:
    """Ovis2Config dict -> OmniConfig.from_dict dict; ValueError for what we do not model.
    `llm_overrides` set LLMConfig runtime fields (scan_layers, dtype, remat_policy, ...)."""
    if hf.get("model_type") != "ovis2":
        raise ValueError(f"not an Ovis2 checkpoint: model_type {hf.get('model_type')!r}; "
                         f"expected 'ovis2' (Ovis2ForConditionalGeneration)")
    top = {**TOP_DEFAULTS, **hf}
    v = {**VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    text = dict(hf.get("text_config") or {})
    if not text:
        raise ValueError("Ovis2 config.json has no text_config (the Qwen2 LLM)")
    tie = bool(top["tie_word_embeddings"])
    llm = qwen2.config_from_hf({**text, "tie_word_embeddings": tie}, **llm_overrides)
    if top.get("hidden_size", llm.hidden_size) != llm.hidden_size:
        raise ValueError(f"Ovis2 hidden_size={top['hidden_size']} (the VTE width) must equal "
                         f"text_config.hidden_size={llm.hidden_size}")
    if not tie and top.get("vocab_size", llm.vocab_size) != llm.vocab_size:
        raise ValueError(f"Ovis2 untied lm_head with vocab_size={top['vocab_size']} rows differs "
                         f"from text_config.vocab_size={llm.vocab_size}; omni_jax's LLM needs "
                         f"one vocabulary for the embedding and the head")
    vit = {ours: v[theirs] for theirs, ours in _VIT_NAMES.items()}
    vit["image_size"], vit["patch_size"] = _int(v["image_size"], "image_size"), \
        _int(v["patch_size"], "patch_size")
    vit = Ovis2ViTConfig.from_dict(vit)
    indicators = top["visual_indicator_token_ids"]
    if not isinstance(indicators, (list, tuple)):
        raise ValueError(f"Ovis2 visual_indicator_token_ids must be a list of ids, got "
                         f"{indicators!r}")
    vte = Ovis2VTEConfig(
        out_dim=llm.hidden_size, vocab_size=v["vocab_size"],
        num_visual_indicator_tokens=v["num_visual_indicator_tokens"],
        hidden_stride=v["hidden_stride"], tokenize_function=v["tokenize_function"],
        init_std=v["initializer_range"], image_token_id=top["image_token_id"],
        indicator_token_ids=tuple(indicators))
    for name, i in (("image_token_id", vte.image_token_id),
                    *(("visual_indicator_token_ids", j) for j in vte.indicator_token_ids)):
        if i >= llm.vocab_size:
            raise ValueError(f"Ovis2 {name} {i} is outside the text vocabulary "
                             f"({llm.vocab_size} ids)")
    side = vit.image_size
    return {"llm": llm.to_dict(),
            "image": {"encoder": ENCODER, "encoder_config": vit.to_dict(), "adapter": ADAPTER,
                      "adapter_config": vte.to_dict(), "image_size": [side, side]}}


def config_to_hf(config: Mapping[str, Any] | Any,
                 base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """OmniConfig (or its dict) -> an Ovis2Config config.json dict; `base` keeps other fields."""
    llm, vit, vte = _parts(config)
    hf = dict(base or {})
    text = qwen2.config_to_hf(llm, hf.get("text_config"))
    for key in ("architectures", "dtype", "torch_dtype"):
        text.pop(key, None)
    vision = {**dict(hf.get("vision_config") or {}), "model_type": "ovis2_vision",
              **{theirs: getattr(vit, ours) for theirs, ours in _VIT_NAMES.items()},
              "vocab_size": vte.vocab_size, "hidden_stride": vte.hidden_stride,
              "num_visual_indicator_tokens": vte.num_visual_indicator_tokens,
              "tokenize_function": vte.tokenize_function}
    vocab = hf.get("vocab_size", llm.vocab_size) if llm.tie_word_embeddings else llm.vocab_size
    hf.update(architectures=["Ovis2ForConditionalGeneration"], model_type="ovis2",
              hidden_size=llm.hidden_size, vocab_size=vocab, image_token_id=vte.image_token_id,
              visual_indicator_token_ids=list(vte.indicator_token_ids),
              tie_word_embeddings=llm.tie_word_embeddings, text_config=text,
              vision_config=vision)
    return hf


def _parts(config: Mapping[str, Any] | Any) -> tuple[LLMConfig, Ovis2ViTConfig, Ovis2VTEConfig]:
    """(llm, vit, vte) configs of an OmniConfig or its from_dict dict with an Ovis2 tower."""
    if isinstance(config, Mapping):
        image = dict(config.get("image") or {})
        if image.get("encoder") != ENCODER or image.get("adapter") != ADAPTER:
            raise ValueError(f"not an Ovis2 model config: image tower must use encoder "
                             f"{ENCODER!r} and adapter {ADAPTER!r}, got "
                             f"{image.get('encoder')!r} / {image.get('adapter')!r}")
        return (LLMConfig.from_dict(config["llm"]),
                Ovis2ViTConfig.from_dict(image["encoder_config"]),
                Ovis2VTEConfig.from_dict(image["adapter_config"]))
    t = getattr(config, "image", None)
    if t is None or t.encoder != ENCODER or t.adapter != ADAPTER:
        raise ValueError(f"not an Ovis2 model config: image tower must use encoder {ENCODER!r} "
                         f"and adapter {ADAPTER!r}")
    return config.llm, t.encoder_config, t.adapter_config


def _llm_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ovis2 language-model keys -> Qwen2ForCausalLM keys (model.*, lm_head.weight)."""
    out = {"model." + k[len(LLM_PREFIX):]: v for k, v in tensors.items()
           if k.startswith(LLM_PREFIX)}
    if "lm_head.weight" in tensors:
        out["lm_head.weight"] = tensors["lm_head.weight"]
    return out


def params_from_hf(config: Mapping[str, Any] | Any,
                   tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Ovis2 state dict (numpy) -> {"params": {"llm", "image_encoder", "image_adapter"}}."""
    llm, vit, vte = _parts(config)
    entries = vision_layout(vit, vte)
    vision = {k: v for k, v in tensors.items()
              if not (k.startswith(LLM_PREFIX) or k == "lm_head.weight")}
    io.check_tensors(vision, {e[0]: e[2] for e in entries}, "Ovis2 vision / VTE")
    flat = {path: np.asarray(fwd(np.asarray(vision[key], np.float32)))
            for key, path, _, fwd, _ in entries}
    params = unflatten(flat)
    params["llm"] = qwen2.params_from_hf(llm, _llm_tensors(tensors))["params"]
    return {"params": params}


def params_to_hf(config: Mapping[str, Any] | Any,
                 variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{"params": OmniModel tree} (boxed or not) -> the Ovis2 state dict."""
    llm, vit, vte = _parts(config)
    params = nn.meta.unbox(dict(variables))
    params = dict(params["params"]) if set(params) == {"params"} else params
    missing = sorted({"llm", "image_encoder", "image_adapter"} - set(params))
    if missing:
        raise ValueError(f"Ovis2 export: params lack {missing} (an OmniModel tree with an "
                         f"Ovis2 image tower)")
    entries = vision_layout(vit, vte)
    flat = {k: np.asarray(v) for k, v in flatten({k: params[k] for k in
                                                  ("image_encoder", "image_adapter")}).items()}
    expected = {path: fwd(np.empty(shape, np.int8)).shape for _, path, shape, fwd, _ in entries}
    io.check_tensors(flat, expected, "omni_jax Ovis2 vision / adapter params")
    out = {key: np.ascontiguousarray(back(flat[path])) for key, path, _, _, back in entries}
    for k, v in qwen2.params_to_hf(llm, {"params": params["llm"]}).items():
        out[k if k == "lm_head.weight" else LLM_PREFIX + k[len("model."):]] = v
    return out


def import_ovis2(path: str, **llm_overrides: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read an Ovis2ForConditionalGeneration directory (model.safetensors or a sharded index)
    -> (OmniConfig dict, {"params": ...} float32 numpy tree for OmniModel)."""
    config = config_from_hf(io.read_config(path), **llm_overrides)
    return config, params_from_hf(config, io.read_tensors(path))


def export_ovis2(config: Mapping[str, Any] | Any, variables: Mapping[str, Any], out_dir: str,
                 base_config: Mapping[str, Any] | None = None, *, dtype: str | None = None,
                 max_shard_bytes: int = io.MAX_SHARD_BYTES) -> None:
    """Write a directory Ovis2ForConditionalGeneration.from_pretrained loads (tensors as given,
    or cast to `dtype` / base_config's "dtype"); base_config: the imported config.json."""
    if dtype is None and base_config:
        dtype = base_config.get("dtype") or base_config.get("torch_dtype")
    io.write_checkpoint(out_dir, config_to_hf(config, base_config),
                        params_to_hf(config, variables), dtype=dtype,
                        max_shard_bytes=max_shard_bytes)
