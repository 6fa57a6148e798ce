"""OpenAI Whisper `.pt` checkpoint (github.com/openai/whisper) -> WhisperEncoder params.

The file is a torch pickle {"dims": ModelDimensions fields, "model_state_dict": {...}}, read
with `torch.load(weights_only=True)`. Only the audio encoder is imported (decoder tensors are
ignored); its keys are renamed to transformers' names and converted by `whisper.hf_to_params`,
so the params tree is exactly the one `import_whisper_encoder` gives for the same weights.
`encoder.positional_embedding` is a buffer (whisper's `sinusoids`); when a file lacks it, the
table is recomputed. Whisper's encoder MLP is 4 x n_audio_state wide with exact GELU, and its
LayerNorms use eps 1e-5, as in transformers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from omni_jax.convert.whisper import hf_to_params
from omni_jax.encoders.audio import WhisperEncoderConfig, sinusoids

DIMS = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer", "n_vocab",
        "n_text_ctx", "n_text_state", "n_text_head", "n_text_layer")
# compute-only fields: a checkpoint of any size may be loaded with these set as `expect` says
_RUNTIME = ("dtype", "param_dtype", "init_std")
_PREFIX = "encoder."
# openai name piece -> transformers name piece (encoder only; order does not matter)
_RENAMES = (("blocks.", "layers."), (".attn.query.", ".self_attn.q_proj."),
            (".attn.key.", ".self_attn.k_proj."), (".attn.value.", ".self_attn.v_proj."),
            (".attn.out.", ".self_attn.out_proj."), (".attn_ln.", ".self_attn_layer_norm."),
            (".mlp.0.", ".fc1."), (".mlp.2.", ".fc2."), (".mlp_ln.", ".final_layer_norm."))
_WHOLE = {"ln_post.weight": "layer_norm.weight", "ln_post.bias": "layer_norm.bias",
          "positional_embedding": "embed_positions.weight"}


def openai_to_hf_key(key: str) -> str:
    """Encoder key without `encoder.` (e.g. `blocks.0.attn.query.weight`) -> transformers'
    WhisperEncoder key (`layers.0.self_attn.q_proj.weight`); conv1/conv2 are unchanged."""
    if key in _WHOLE:
        return _WHOLE[key]
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key


def config_from_dims(dims: Mapping[str, Any], dtype: str = "float32") -> WhisperEncoderConfig:
    """OpenAI ModelDimensions dict -> WhisperEncoderConfig; ValueError on missing fields."""
    missing = [k for k in DIMS if k not in dims]
    if missing:
        raise ValueError(f"OpenAI Whisper dims: missing {missing}; expected all of {list(DIMS)}")
    d = int(dims["n_audio_state"])
    return WhisperEncoderConfig(
        num_mel_bins=int(dims["n_mels"]), d_model=d, encoder_layers=int(dims["n_audio_layer"]),
        encoder_attention_heads=int(dims["n_audio_head"]), encoder_ffn_dim=4 * d,
        max_source_positions=int(dims["n_audio_ctx"]), activation_function="gelu",
        layer_norm_eps=1e-5, dtype=dtype, param_dtype=dtype)


def read_pt(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """`.pt` file -> (dims, float32 numpy state dict); ValueError for anything else."""
    if not os.path.isfile(path):
        raise ValueError(f"OpenAI Whisper checkpoint {path!r} is not a file")
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling / zip errors come in many types
        raise ValueError(f"{path}: cannot read as a torch checkpoint ({e})") from e
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path}: expected a dict with 'dims' and 'model_state_dict', got "
                         f"{type(ckpt).__name__}")
    missing = [k for k in ("dims", "model_state_dict") if not isinstance(ckpt.get(k), Mapping)]
    if missing:
        raise ValueError(f"{path}: not an OpenAI Whisper checkpoint: no {missing} dict (keys "
                         f"{sorted(map(str, ckpt))}); expected 'dims' and 'model_state_dict'")
    state = {k: v.detach().float().numpy() for k, v in ckpt["model_state_dict"].items()
             if isinstance(v, torch.Tensor) and not v.is_sparse}
    return dict(ckpt["dims"]), state


def _check_expect(config: WhisperEncoderConfig, expect: WhisperEncoderConfig,
                  path: str) -> WhisperEncoderConfig:
    got, want = config.to_dict(), expect.to_dict()
    diff = {k: (got[k], want[k]) for k in got if k not in _RUNTIME and got[k] != want[k]}
    if diff:
        raise ValueError(f"{path}: OpenAI Whisper checkpoint does not match the expected "
                         "encoder config; (checkpoint, expected): "
                         + ", ".join(f"{k}: {v}" for k, v in sorted(diff.items())))
    return config.replace(**{k: want[k] for k in _RUNTIME})


def import_whisper_pt(path: str, expect: WhisperEncoderConfig | None = None
                      ) -> tuple[WhisperEncoderConfig, dict[str, Any]]:
    """OpenAI Whisper `.pt` -> (config, {"params": ...}), the tree `import_whisper_encoder`
    gives. With `expect`, every size field must match it (ValueError naming each mismatch);
    its dtype / param_dtype / init_std are then used."""
    dims, state = read_pt(path)
    config = config_from_dims(dims)
    if expect is not None:
        config = _check_expect(config, expect, path)
    enc = {openai_to_hf_key(k[len(_PREFIX):]): v for k, v in state.items()
           if k.startswith(_PREFIX)}
    if not enc:
        raise ValueError(f"{path}: no '{_PREFIX}*' tensors in model_state_dict (keys "
                         f"{sorted(state)[:4]}...); expected an OpenAI Whisper model")
    if "embed_positions.weight" not in enc:  # buffer left out of some files: recompute it
        enc["embed_positions.weight"] = sinusoids(config.max_source_positions, config.d_model)
    try:
        return config, {"params": hf_to_params(config, enc)}
    except ValueError as e:
        raise ValueError(f"{path}: {e} (keys named as in transformers; see openai_to_hf_key)"
                         ) from None
