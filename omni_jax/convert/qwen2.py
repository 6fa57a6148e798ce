"""Qwen2ForCausalLM checkpoints (config.json + safetensors) <-> (LLMConfig, params)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from omni_jax.convert import io
from omni_jax.convert.tree import flatten, stack_layers, unflatten, unstack_layers
from omni_jax.llm.config import LLMConfig

_HF_LAYER = "model.layers.{i}."


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> LLMConfig:
    """Qwen2Config dict -> LLMConfig; ValueError for features we do not implement."""
    if hf.get("model_type") not in ("qwen2", None):
        raise ValueError(f"expected a qwen2 config, got model_type={hf.get('model_type')!r}")
    if hf.get("use_sliding_window"):
        raise ValueError("Qwen2 sliding-window attention is not supported (use_sliding_window)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Qwen2 hidden_act must be 'silu', got {hf.get('hidden_act')!r}")
    rope = dict(hf.get("rope_parameters") or {})
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ValueError(f"only default RoPE is supported, got {rope or hf.get('rope_scaling')}")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    heads = hf["num_attention_heads"]
    return LLMConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim"), rope_theta=float(theta),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=hf.get("initializer_range", 0.02), **overrides)


def config_to_hf(c: LLMConfig, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """LLMConfig -> Qwen2Config dict; `base` (an imported config.json) keeps token ids etc."""
    hf = dict(base or {})
    hf.update(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=c.vocab_size,
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings, initializer_range=c.initializer_range,
        use_sliding_window=False, dtype="float32")
    hf.pop("rope_theta", None)
    hf.pop("rope_scaling", None)
    hf.pop("layer_types", None)
    return hf


def _hf_shapes(c: LLMConfig) -> dict[str, tuple[int, ...]]:
    d, h, kv, hd, f = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    shapes = {"model.embed_tokens.weight": (c.vocab_size, d), "model.norm.weight": (d,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, d)
    for i in range(c.num_layers):
        p = _HF_LAYER.format(i=i)
        shapes.update({
            p + "self_attn.q_proj.weight": (h * hd, d), p + "self_attn.q_proj.bias": (h * hd,),
            p + "self_attn.k_proj.weight": (kv * hd, d), p + "self_attn.k_proj.bias": (kv * hd,),
            p + "self_attn.v_proj.weight": (kv * hd, d), p + "self_attn.v_proj.bias": (kv * hd,),
            p + "self_attn.o_proj.weight": (d, h * hd),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
    return shapes


def params_from_hf(c: LLMConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """HF state dict (numpy) -> {"params": tree} in our layout (stacked when scan_layers)."""
    tensors = dict(tensors)
    if c.tie_word_embeddings:  # some exports write the tied head anyway
        tensors.pop("lm_head.weight", None)
    io.check_tensors(tensors, _hf_shapes(c), "Qwen2", ignore_unexpected=("model.rotary_emb.",))
    t = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    h, kv, hd = c.num_heads, c.num_kv_heads, c.head_dim
    flat = {"embed/embedding": t["model.embed_tokens.weight"], "norm/scale": t["model.norm.weight"]}
    if not c.tie_word_embeddings:
        flat["lm_head/kernel"] = t["lm_head.weight"].T
    for i in range(c.num_layers):
        p, q = _HF_LAYER.format(i=i), f"layers_{i}/"
        for name, heads in (("q", h), ("k", kv), ("v", kv)):
            w = t[p + f"self_attn.{name}_proj.weight"]
            flat[q + f"attn/{name}/kernel"] = w.T.reshape(c.hidden_size, heads, hd)
            flat[q + f"attn/{name}/bias"] = t[p + f"self_attn.{name}_proj.bias"].reshape(heads, hd)
        flat[q + "attn/o/kernel"] = t[p + "self_attn.o_proj.weight"].T.reshape(h, hd, c.hidden_size)
        for name in ("gate", "up", "down"):
            flat[q + f"mlp/{name}/kernel"] = t[p + f"mlp.{name}_proj.weight"].T
        flat[q + "input_norm/scale"] = t[p + "input_layernorm.weight"]
        flat[q + "post_attn_norm/scale"] = t[p + "post_attention_layernorm.weight"]
    params = unflatten(flat)
    if c.scan_layers:
        params = stack_layers(params, c.num_layers)
    return {"params": params}


def params_to_hf(c: LLMConfig, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{"params": tree} -> HF state dict (numpy, each tensor in its own dtype)."""
    params = dict(variables["params"])
    if c.scan_layers:
        params = unstack_layers(params, c.num_layers)
    f = {k: np.asarray(v) for k, v in flatten(params).items()}
    out = {"model.embed_tokens.weight": f["embed/embedding"], "model.norm.weight": f["norm/scale"]}
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = f["lm_head/kernel"].T
    for i in range(c.num_layers):
        p, q = _HF_LAYER.format(i=i), f"layers_{i}/"
        for name in ("q", "k", "v"):
            w = f[q + f"attn/{name}/kernel"]
            out[p + f"self_attn.{name}_proj.weight"] = w.reshape(c.hidden_size, -1).T
            out[p + f"self_attn.{name}_proj.bias"] = f[q + f"attn/{name}/bias"].reshape(-1)
        out[p + "self_attn.o_proj.weight"] = f[q + "attn/o/kernel"].reshape(-1, c.hidden_size).T
        for name in ("gate", "up", "down"):
            out[p + f"mlp.{name}_proj.weight"] = f[q + f"mlp/{name}/kernel"].T
        out[p + "input_layernorm.weight"] = f[q + "input_norm/scale"]
        out[p + "post_attention_layernorm.weight"] = f[q + "post_attn_norm/scale"]
    io.check_tensors(out, _hf_shapes(c), "Qwen2 (export)")
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def import_qwen2(path: str, **overrides: Any) -> tuple[LLMConfig, dict[str, Any]]:
    """Read a Qwen2ForCausalLM directory; `overrides` set e.g. scan_layers, dtype."""
    config = config_from_hf(io.read_config(path), **overrides)
    return config, params_from_hf(config, io.read_tensors(path))


def export_qwen2(config: LLMConfig, variables: Mapping[str, Any], out_dir: str,
                 base_config: Mapping[str, Any] | None = None, *, dtype: str | None = None,
                 max_shard_bytes: int = io.MAX_SHARD_BYTES) -> None:
    """Write a directory transformers loads with Qwen2ForCausalLM.from_pretrained. dtype:
    the tensors' dtype (default: the source checkpoint's, from base_config's "dtype" /
    "torch_dtype", else the params' own); sharded with an index above max_shard_bytes."""
    if dtype is None and base_config:
        dtype = base_config.get("dtype") or base_config.get("torch_dtype")
    io.write_checkpoint(out_dir, config_to_hf(config, base_config),
                        params_to_hf(config, variables), dtype=dtype,
                        max_shard_bytes=max_shard_bytes)
