"""Whisper encoder: Hugging Face checkpoint directory <-> (WhisperEncoderConfig, params).

Import reads a directory saved by `WhisperModel` (keys `encoder.*`) or
`WhisperForConditionalGeneration` (keys `model.encoder.*`); decoder / `proj_out` tensors are
ignored (their count is logged at INFO level): omni_jax only carries the encoder.

Export writes a directory that `transformers` loads as `WhisperModel`:
- with `base_dir` (the checkpoint the encoder came from): the base's config.json and every
  non-encoder tensor (decoder, `proj_out`, ...) are carried through unchanged and only the
  encoder tensors are replaced, so the result is a complete, working Whisper model (loadable
  as whatever the base was, e.g. WhisperForConditionalGeneration);
- without `base_dir`: only the encoder is written, with a WhisperConfig whose decoder mirrors
  the encoder's sizes. `from_pretrained` then reports the decoder weights as missing and
  initializes them randomly — the encoder is exact, the decoder is NOT a trained decoder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from omni_jax.convert.io import check_tensors, read_config, read_tensors, write_checkpoint
from omni_jax.convert.tree import export_by_rules
from omni_jax.encoders.audio import WhisperEncoderConfig
from omni_jax.layers.common import parse_dtype

log = logging.getLogger(__name__)

# (HF suffix, our path, hf->ours, ours->hf, HF shape); `c` is the config.
Rule = tuple[str, tuple[str, ...], Callable, Callable, tuple[int, ...]]
_HF_LN_EPS = 1e-5  # transformers' Whisper LayerNorms use the torch default eps


def _rules(c: WhisperEncoderConfig) -> list[Rule]:
    d, h, hd, f, m = c.d_model, c.encoder_attention_heads, c.head_dim, c.encoder_ffn_dim, \
        c.num_mel_bins
    conv_in = lambda w: w.transpose(2, 1, 0)  # [out, in, k] -> [k, in, out]
    conv_out = lambda w: w.transpose(2, 1, 0)
    same = lambda w: w
    rules: list[Rule] = [
        ("conv1.weight", ("conv1", "kernel"), conv_in, conv_out, (d, m, 3)),
        ("conv1.bias", ("conv1", "bias"), same, same, (d,)),
        ("conv2.weight", ("conv2", "kernel"), conv_in, conv_out, (d, d, 3)),
        ("conv2.bias", ("conv2", "bias"), same, same, (d,)),
        ("embed_positions.weight", ("embed_positions",), same, same,
         (c.max_source_positions, d)),
        ("layer_norm.weight", ("layer_norm", "scale"), same, same, (d,)),
        ("layer_norm.bias", ("layer_norm", "bias"), same, same, (d,)),
    ]
    qkv_in = lambda w: w.T.reshape(d, h, hd)  # torch Linear [out, in] -> [embed, heads, hd]
    qkv_out = lambda w: w.reshape(d, d).T
    hb_in = lambda b: b.reshape(h, hd)
    hb_out = lambda b: b.reshape(d)
    o_in = lambda w: w.T.reshape(h, hd, d)
    o_out = lambda w: w.reshape(d, d).T
    lin = lambda w: w.T
    for i in range(c.encoder_layers):
        p, q = f"layers.{i}.", f"layers_{i}"
        rules += [
            (p + "self_attn.q_proj.weight", (q, "attn", "q", "kernel"), qkv_in, qkv_out, (d, d)),
            (p + "self_attn.q_proj.bias", (q, "attn", "q", "bias"), hb_in, hb_out, (d,)),
            (p + "self_attn.k_proj.weight", (q, "attn", "k", "kernel"), qkv_in, qkv_out, (d, d)),
            (p + "self_attn.v_proj.weight", (q, "attn", "v", "kernel"), qkv_in, qkv_out, (d, d)),
            (p + "self_attn.v_proj.bias", (q, "attn", "v", "bias"), hb_in, hb_out, (d,)),
            (p + "self_attn.out_proj.weight", (q, "attn", "o", "kernel"), o_in, o_out, (d, d)),
            (p + "self_attn.out_proj.bias", (q, "attn", "o", "bias"), same, same, (d,)),
            (p + "self_attn_layer_norm.weight", (q, "attn_norm", "scale"), same, same, (d,)),
            (p + "self_attn_layer_norm.bias", (q, "attn_norm", "bias"), same, same, (d,)),
            (p + "fc1.weight", (q, "mlp", "fc1", "kernel"), lin, lin, (f, d)),
            (p + "fc1.bias", (q, "mlp", "fc1", "bias"), same, same, (f,)),
            (p + "fc2.weight", (q, "mlp", "fc2", "kernel"), lin, lin, (d, f)),
            (p + "fc2.bias", (q, "mlp", "fc2", "bias"), same, same, (d,)),
            (p + "final_layer_norm.weight", (q, "mlp_norm", "scale"), same, same, (d,)),
            (p + "final_layer_norm.bias", (q, "mlp_norm", "bias"), same, same, (d,)),
        ]
    return rules


def config_from_hf(hf: Mapping[str, Any], dtype: str = "float32") -> WhisperEncoderConfig:
    """WhisperConfig dict -> WhisperEncoderConfig (ValueError if it is not a Whisper config)."""
    if hf.get("model_type") != "whisper":
        raise ValueError(f"expected a Whisper checkpoint (model_type 'whisper'), got "
                         f"model_type {hf.get('model_type')!r}")
    keys = ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads",
            "encoder_ffn_dim", "max_source_positions", "activation_function", "init_std")
    defaults = WhisperEncoderConfig.__dataclass_fields__
    kw = {k: hf.get(k, defaults[k].default) for k in keys}
    return WhisperEncoderConfig(**kw, layer_norm_eps=_HF_LN_EPS, dtype=dtype, param_dtype=dtype)


def config_to_hf(c: WhisperEncoderConfig) -> dict[str, Any]:
    """WhisperEncoderConfig -> the encoder fields of a WhisperConfig dict."""
    if c.layer_norm_eps != _HF_LN_EPS:
        raise ValueError(f"transformers' Whisper fixes LayerNorm eps at {_HF_LN_EPS}; cannot "
                         f"export layer_norm_eps={c.layer_norm_eps}")
    return {"num_mel_bins": c.num_mel_bins, "d_model": c.d_model,
            "encoder_layers": c.encoder_layers,
            "encoder_attention_heads": c.encoder_attention_heads,
            "encoder_ffn_dim": c.encoder_ffn_dim, "max_source_positions": c.max_source_positions,
            "activation_function": c.activation_function, "init_std": c.init_std}


def _encoder_prefix(keys: Any) -> str:
    keys = list(keys)
    if any(k.startswith("model.encoder.") for k in keys):
        return "model.encoder."
    if any(k.startswith("encoder.") for k in keys):
        return "encoder."
    raise ValueError("no Whisper encoder tensors found: expected keys starting with "
                     "'encoder.' (WhisperModel) or 'model.encoder.' "
                     "(WhisperForConditionalGeneration)")


def hf_to_params(c: WhisperEncoderConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Encoder tensors (prefix stripped) -> our params tree (validated: missing/extra/shape)."""
    rules = _rules(c)
    check_tensors(tensors, {k: s for k, _, _, _, s in rules}, "Whisper encoder")
    pdt = parse_dtype(c.param_dtype)
    params: dict[str, Any] = {}
    for key, path, to_ours, _, _ in rules:
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = jax.numpy.asarray(to_ours(np.asarray(tensors[key], np.float32)), pdt)
    return params


def params_to_hf(c: WhisperEncoderConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Our params tree -> encoder tensors (no prefix), float32; ValueError on missing params."""
    return export_by_rules(params, _rules(c), "Whisper encoder")


def import_whisper_encoder(path: str, dtype: str = "float32"
                           ) -> tuple[WhisperEncoderConfig, dict[str, Any]]:
    """HF Whisper checkpoint dir -> (config, {"params": ...}); decoder tensors are ignored."""
    config = config_from_hf(read_config(path), dtype)
    tensors = read_tensors(path)
    prefix = _encoder_prefix(tensors)
    enc = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    ignored = len(tensors) - len(enc)
    if ignored:
        log.info("import_whisper_encoder: ignored %d non-encoder tensors (decoder/proj_out) "
                 "of %s", ignored, path)
    return config, {"params": hf_to_params(config, enc)}


def export_whisper_encoder(config: WhisperEncoderConfig, params: Mapping[str, Any],
                           out_dir: str, base_dir: str | None = None) -> None:
    """Write a WhisperModel-loadable dir; see the module docstring for the decoder policy."""
    params = params.get("params", params) if isinstance(params, Mapping) else params
    enc = params_to_hf(config, params)
    if base_dir is None:
        hf = {"model_type": "whisper", "architectures": ["WhisperModel"],
              **config_to_hf(config), "decoder_layers": config.encoder_layers,
              "decoder_attention_heads": config.encoder_attention_heads,
              "decoder_ffn_dim": config.encoder_ffn_dim, "torch_dtype": "float32"}
        write_checkpoint(out_dir, hf, {"encoder." + k: v for k, v in enc.items()})
        return
    hf = dict(read_config(base_dir))
    base_enc = config_from_hf(hf)
    mismatch = {k: (v, base_enc.to_dict()[k]) for k, v in config_to_hf(config).items()
                if k != "init_std" and base_enc.to_dict()[k] != v}
    if mismatch:
        raise ValueError(f"export_whisper_encoder: config differs from base {base_dir!r} "
                         f"(ours, base): {mismatch}")
    tensors = read_tensors(base_dir)
    prefix = _encoder_prefix(tensors)
    out = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    out.update({prefix + k: v for k, v in enc.items()})
    write_checkpoint(out_dir, hf, out)
