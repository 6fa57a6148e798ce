"""unilm BEATs checkpoint file (`{"cfg": dict, "model": state_dict}`) <-> (BEATsConfig, params).

Import reads the released `BEATs_iter3*.pt` files with `torch.load(weights_only=True)`. The
positional conv's weight norm is read as `weight_g` / `weight_v` (torch.nn.utils.weight_norm),
as `parametrizations.weight.original0/1` (the parametrize API), or as a plain `weight` (weight
norm already removed: v = weight, g = its per-tap norm). The shared relative-position table is
listed under every layer; layer 0's is used and the others must equal it. A fine-tuned file's
`predictor.*` head and `label_dict` are left out (features only). cfg keys unilm reads only for
training (dropouts, layerdrop, gradient decay, predictor) are ignored, as are keys unilm's
BEATsConfig does not know (it accepts any); unsupported values raise ValueError.

Export writes the same format (weight_g / weight_v naming, the table under every layer), so
export -> import gives identical tensors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from omni_jax.convert.io import check_tensors
from omni_jax.convert.tree import export_by_rules
from omni_jax.encoders.beats import ACTIVATIONS, BEATsConfig
from omni_jax.layers.common import parse_dtype

NATIVE_KIND = "beats_encoder"
# unilm BEATsConfig defaults (what a cfg without a key means)
UNILM_DEFAULTS: dict[str, Any] = dict(
    input_patch_size=-1, embed_dim=512, conv_bias=False, encoder_layers=12,
    encoder_embed_dim=768, encoder_ffn_embed_dim=3072, encoder_attention_heads=12,
    activation_fn="gelu", layer_wise_gradient_decay_ratio=1.0, layer_norm_first=False,
    deep_norm=False, dropout=0.1, attention_dropout=0.1, activation_dropout=0.0,
    encoder_layerdrop=0.0, dropout_input=0.0, conv_pos=128, conv_pos_groups=16,
    relative_position_embedding=False, num_buckets=320, max_distance=1280, gru_rel_pos=False,
    finetuned_model=False, predictor_dropout=0.1, predictor_class=527)
_INTS = ("embed_dim", "encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim",
         "encoder_attention_heads", "conv_pos", "conv_pos_groups", "num_buckets", "max_distance")
_BOOLS = ("conv_bias", "layer_norm_first", "deep_norm", "relative_position_embedding",
          "gru_rel_pos")
_WN = "encoder.pos_conv.0."
_TABLE0 = "encoder.layers.0.self_attn.relative_attention_bias.weight"
Rule = tuple[str, tuple[str, ...], Callable, Callable, tuple[int, ...]]


def config_from_unilm(cfg: Mapping[str, Any], **overrides: Any) -> BEATsConfig:
    """unilm cfg dict -> BEATsConfig (ValueError naming the unsupported value)."""
    if not isinstance(cfg, Mapping):
        raise ValueError(f"BEATs cfg must be a dict, got {type(cfg).__name__}")
    full = {**UNILM_DEFAULTS, **cfg}
    kw: dict[str, Any] = {}
    for k in _INTS + ("input_patch_size",):
        v = full[k]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"BEATs cfg: {k}={v!r} is not supported (expected a positive int)")
        kw["patch_size" if k == "input_patch_size" else k] = v
    for k in _BOOLS:
        v = full[k]
        if v not in (True, False):  # unilm compares gru_rel_pos == 1: 0 / 1 pass too
            raise ValueError(f"BEATs cfg: {k}={v!r} is not supported (expected a bool)")
        kw[k] = bool(v)
    act = full["activation_fn"]
    if act not in ACTIVATIONS:
        raise ValueError(f"BEATs cfg: activation_fn={act!r} is not supported (expected one of "
                         f"{sorted(ACTIVATIONS)})")
    kw["activation_fn"] = act
    kw.update(overrides)
    try:
        return BEATsConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"BEATs cfg is not supported: {e}") from e


def config_to_unilm(c: BEATsConfig) -> dict[str, Any]:
    """BEATsConfig -> a complete unilm cfg dict (features only: finetuned_model False)."""
    unilm_fixed = BEATsConfig()  # the front end unilm hard-codes in BEATs.preprocess
    front = ("sample_rate", "num_mel_bins", "frame_length_ms", "frame_shift_ms", "preemphasis",
             "low_freq", "high_freq", "waveform_scale", "fbank_mean", "fbank_std",
             "layer_norm_eps")
    diff = {k: getattr(c, k) for k in front if getattr(c, k) != getattr(unilm_fixed, k)}
    if diff:
        raise ValueError(f"unilm's BEATs fixes these front-end / norm settings; cannot export "
                         f"{diff}")
    out = dict(UNILM_DEFAULTS, input_patch_size=c.patch_size, activation_fn=c.activation_fn)
    out.update({k: getattr(c, k) for k in _INTS + _BOOLS})
    return out


def _ln(key: str, ours: tuple[str, ...], width: int) -> list[Rule]:
    same = lambda w: w  # noqa: E731
    return [(f"{key}.weight", (*ours, "scale"), same, same, (width,)),
            (f"{key}.bias", (*ours, "bias"), same, same, (width,))]


def _rules(c: BEATsConfig) -> list[Rule]:
    e, d, h, hd, f, p, k = c.embed_dim, c.encoder_embed_dim, c.encoder_attention_heads, \
        c.head_dim, c.encoder_ffn_embed_dim, c.patch_size, c.conv_pos
    same = lambda w: w  # noqa: E731
    lin = lambda w: w.T  # noqa: E731  torch Linear [out, in] <-> Dense [in, out]
    ln = lambda key, ours, w=d: _ln(key, ours, w)  # noqa: E731
    rules: list[Rule] = [
        ("patch_embedding.weight", ("patch_embedding", "kernel"),
         lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1), (e, 1, p, p)),
        *ln("layer_norm", ("layer_norm",), e),
        (_WN + "weight_v", ("pos_conv", "weight_v"), lambda w: w.transpose(2, 1, 0),
         lambda w: w.transpose(2, 1, 0), (d, d // c.conv_pos_groups, k)),
        (_WN + "weight_g", ("pos_conv", "weight_g"), lambda w: w.reshape(k),
         lambda w: w.reshape(1, 1, k), (1, 1, k)),
        (_WN + "bias", ("pos_conv", "bias"), same, same, (d,)),
        *ln("encoder.layer_norm", ("encoder_norm",)),
    ]
    if c.conv_bias:
        rules.append(("patch_embedding.bias", ("patch_embedding", "bias"), same, same, (e,)))
    if e != d:
        rules += [("post_extract_proj.weight", ("post_extract_proj", "kernel"), lin, lin, (d, e)),
                  ("post_extract_proj.bias", ("post_extract_proj", "bias"), same, same, (d,))]
    if c.relative_position_embedding:
        rules.append((_TABLE0,
                      ("relative_attention_bias",), same, same, (c.num_buckets, h)))
    qkv_in, qkv_out = (lambda w: w.T.reshape(d, h, hd)), (lambda w: w.reshape(d, d).T)
    hb_in, hb_out = (lambda b: b.reshape(h, hd)), (lambda b: b.reshape(d))
    o_in, o_out = (lambda w: w.T.reshape(h, hd, d)), (lambda w: w.reshape(d, d).T)
    for i in range(c.encoder_layers):
        t, q = f"encoder.layers.{i}.", f"layers_{i}"
        for n in "qkv":
            rules += [(f"{t}self_attn.{n}_proj.weight", (q, "attn", n, "kernel"), qkv_in,
                       qkv_out, (d, d)),
                      (f"{t}self_attn.{n}_proj.bias", (q, "attn", n, "bias"), hb_in, hb_out,
                       (d,))]
        rules += [
            (t + "self_attn.out_proj.weight", (q, "attn", "o", "kernel"), o_in, o_out, (d, d)),
            (t + "self_attn.out_proj.bias", (q, "attn", "o", "bias"), same, same, (d,)),
            *ln(t + "self_attn_layer_norm", (q, "attn_norm")),
            (t + "fc1.weight", (q, "fc1", "kernel"), lin, lin, (f, d)),
            (t + "fc1.bias", (q, "fc1", "bias"), same, same, (f,)),
            (t + "fc2.weight", (q, "fc2", "kernel"), lin, lin, (d, f)),
            (t + "fc2.bias", (q, "fc2", "bias"), same, same, (d,)),
            *ln(t + "final_layer_norm", (q, "mlp_norm")),
        ]
        if c.gru_rel_pos:
            rules += [
                (t + "self_attn.grep_linear.weight", (q, "attn", "grep_linear", "kernel"), lin,
                 lin, (8, hd)),
                (t + "self_attn.grep_linear.bias", (q, "attn", "grep_linear", "bias"), same,
                 same, (8,)),
                (t + "self_attn.grep_a", (q, "attn", "grep_a"), lambda w: w.reshape(h),
                 lambda w: w.reshape(1, h, 1, 1), (1, h, 1, 1))]
    return rules


def _shared_tables(c: BEATsConfig) -> list[str]:
    if not c.relative_position_embedding:
        return []
    return [f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"
            for i in range(1, c.encoder_layers)]


def _normalize(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Parametrize-API or plain pos-conv weights -> weight_g / weight_v; predictor dropped."""
    out = {k: v for k, v in tensors.items() if not k.startswith("predictor.")}
    alias = {_WN + "parametrizations.weight.original0": _WN + "weight_g",
             _WN + "parametrizations.weight.original1": _WN + "weight_v"}
    for old, new in alias.items():
        if old in out:
            out[new] = out.pop(old)
    plain = out.pop(_WN + "weight", None)
    if plain is not None and _WN + "weight_v" not in out and plain.ndim == 3:
        out[_WN + "weight_v"] = plain
        out[_WN + "weight_g"] = np.sqrt((plain.astype(np.float64) ** 2).sum(axis=(0, 1)))[
            None, None].astype(plain.dtype)
    return out


def unilm_to_params(c: BEATsConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """unilm state dict -> our params tree (validated: missing / unexpected keys, shapes)."""
    tensors = _normalize(dict(tensors))
    rules = _rules(c)
    expected = {key: s for key, _, _, _, s in rules}
    shared = {k: (c.num_buckets, c.encoder_attention_heads) for k in _shared_tables(c)
              if k in tensors}
    check_tensors(tensors, {**expected, **shared}, "BEATs")
    if shared:
        first = np.asarray(tensors[_TABLE0])
        differ = [k for k in shared if not np.array_equal(np.asarray(tensors[k]), first)]
        if differ:
            raise ValueError(f"BEATs checkpoint: the relative position table is shared by all "
                             f"layers, but {differ[:3]} differ from {_TABLE0}")
    pdt = parse_dtype(c.param_dtype)
    params: dict[str, Any] = {}
    for key, path, to_ours, _, _ in rules:
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = jax.numpy.asarray(to_ours(np.asarray(tensors[key])), pdt)
    return params


def params_to_unilm(c: BEATsConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Our params tree -> unilm state dict arrays (float32; table under every layer)."""
    out = export_by_rules(params, _rules(c), "BEATs")
    for key in _shared_tables(c):
        out[key] = out[_TABLE0]
    return out


def read_unilm(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """torch.load(weights_only=True) a unilm file -> (cfg, state dict as numpy arrays)."""
    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"BEATs checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of many kinds
        raise ValueError(f"{path}: cannot read torch checkpoint ({e})") from e
    missing = [k for k in ("cfg", "model") if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise ValueError(f"{path}: not a unilm BEATs checkpoint: expected a dict with 'cfg' "
                         f"(BEATsConfig fields) and 'model' (state dict), missing {missing}")
    cfg, sd = obj["cfg"], obj["model"]
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: 'cfg' must be a dict, got {type(cfg).__name__}")
    bad = sorted(k for k, v in sd.items() if not torch.is_tensor(v)) if isinstance(sd, dict) \
        else ["<not a dict>"]
    if bad:
        raise ValueError(f"{path}: 'model' is not a state dict of tensors ({bad[:5]})")
    as_np = lambda t: (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # noqa: E731
    return cfg, {k: as_np(v.detach().cpu()) for k, v in sd.items()}


def import_beats(path: str | os.PathLike, **overrides: Any) -> tuple[BEATsConfig, dict[str, Any]]:
    """unilm BEATs .pt -> (BEATsConfig, {"params": ...}); overrides e.g. dtype="bfloat16"."""
    cfg, tensors = read_unilm(path)
    config = config_from_unilm(cfg, **overrides)
    return config, {"params": unilm_to_params(config, tensors)}


def export_beats(config: BEATsConfig, params: Mapping[str, Any],
                 path: str | os.PathLike) -> None:
    """Write `{"cfg", "model"}` as unilm's BEATs loads it (BEATs(BEATsConfig(cfg)))."""
    import torch

    params = params.get("params", params) if isinstance(params, Mapping) else params
    sd = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in
          params_to_unilm(config, params).items()}
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    torch.save({"cfg": config_to_unilm(config), "model": sd}, os.fspath(path))


def load_native_beats(path: str) -> tuple[BEATsConfig, dict[str, Any]]:
    """Read a native dir written by registry.save_native(kind=NATIVE_KIND)."""
    from omni_jax.convert.registry import read_native

    meta, params = read_native(path, NATIVE_KIND)
    return BEATsConfig.from_dict(meta["config"]), params
