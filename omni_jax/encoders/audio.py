"""Whisper-style audio encoder (log-mel -> conv stem -> pre-LN transformer), HF-compatible.

Matches transformers' WhisperEncoder in fp32 on full 30 s inputs and additionally accepts
shorter inputs (the first frames/2 rows of the position table are used) and an optional frame
mask that removes padded frames from attention (HF has no such mask; off by default).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.config_base import StrictConfig, check_positive
from omni_jax.layers.attention import Attention
from omni_jax.layers.common import constrain, logical_init, parse_dtype
from omni_jax.layers.mlp import GeluMLP, activation
from omni_jax.layers.norms import LayerNorm

_ACT = ("act_batch", "act_len", "act_embed")


@dataclasses.dataclass(frozen=True)
class WhisperEncoderConfig(StrictConfig):
    """Whisper encoder hyper-parameters (names follow transformers' WhisperConfig)."""

    num_mel_bins: int = 80
    d_model: int = 64
    encoder_layers: int = 2
    encoder_attention_heads: int = 4
    encoder_ffn_dim: int = 128
    max_source_positions: int = 1500
    activation_function: str = "gelu"
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.num_mel_bins not in (80, 128):
            raise ValueError(f"WhisperEncoderConfig.num_mel_bins must be 80 or 128, got "
                             f"{self.num_mel_bins!r}")
        check_positive("WhisperEncoderConfig", d_model=self.d_model,
                       encoder_layers=self.encoder_layers,
                       encoder_attention_heads=self.encoder_attention_heads,
                       encoder_ffn_dim=self.encoder_ffn_dim,
                       max_source_positions=self.max_source_positions,
                       layer_norm_eps=self.layer_norm_eps, init_std=self.init_std)
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(
                f"WhisperEncoderConfig: encoder_attention_heads={self.encoder_attention_heads} "
                f"must divide d_model={self.d_model}")
        if self.d_model % 2 or self.d_model < 4:
            raise ValueError(f"WhisperEncoderConfig: d_model must be even and >= 4 (sinusoidal "
                             f"positions), got {self.d_model}")
        activation(self.activation_function)  # ValueError on unknown names
        parse_dtype(self.dtype)
        parse_dtype(self.param_dtype)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def max_frames(self) -> int:
        """Longest accepted mel input (two frames per output position, conv2 stride 2)."""
        return 2 * self.max_source_positions


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's sinusoidal position table [length, channels]: sin half, then cos half."""
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-inc * np.arange(channels // 2, dtype=np.float32))
    t = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


def lengths_to_frame_mask(lengths: jax.Array, frames: int) -> jax.Array:
    """[batch] valid mel-frame counts -> [batch, frames] bool (True = real frame)."""
    return jnp.arange(frames)[None, :] < jnp.asarray(lengths)[:, None]


def output_frame_mask(frame_mask: jax.Array) -> jax.Array:
    """Mel-frame mask [batch, frames] -> encoder-output mask [batch, frames // 2].

    Output i comes from mel frame 2i (conv2 stride 2), so a prefix of L valid frames gives
    ceil(L / 2) valid outputs, as HF's `_get_feat_extract_output_lengths`.
    """
    return frame_mask[:, ::2]


class WhisperBlock(nn.Module):
    """x + attn(LN(x)); x + mlp(LN(x)) — Whisper attention has q/v/out bias, no k bias."""

    config: WhisperEncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:  # [b, t, d]
        c = self.config
        dt, pdt = parse_dtype(c.dtype), parse_dtype(c.param_dtype)
        h = LayerNorm(c.layer_norm_eps, dtype=dt, param_dtype=pdt, name="attn_norm")(x)
        h, _ = Attention(c.encoder_attention_heads, c.encoder_attention_heads, c.head_dim,
                         q_bias=True, k_bias=False, v_bias=True, o_bias=True, rope_theta=None,
                         init_std=c.init_std, dtype=dt, param_dtype=pdt, name="attn")(h, mask)
        x = constrain(x + h, _ACT)
        h = LayerNorm(c.layer_norm_eps, dtype=dt, param_dtype=pdt, name="mlp_norm")(x)
        h = GeluMLP(c.encoder_ffn_dim, c.activation_function, c.init_std, dt, pdt,
                    name="mlp")(h)
        return constrain(x + h, _ACT)


class WhisperEncoder(nn.Module):
    """Log-mel [batch, n_mels, frames] -> hidden states [batch, frames // 2, d_model]."""

    config: WhisperEncoderConfig

    def _conv(self, name: str, stride: int) -> nn.Conv:
        c = self.config
        return nn.Conv(c.d_model, (3,), strides=(stride,), padding=((1, 1),),
                       dtype=parse_dtype(c.dtype), param_dtype=parse_dtype(c.param_dtype),
                       kernel_init=logical_init(nn.initializers.normal(c.init_std),
                                                ("conv", None, "embed")),
                       bias_init=logical_init(nn.initializers.zeros, ("embed",)), name=name)

    def validate(self, input_features: Any, frame_mask: Any = None, lengths: Any = None) -> None:
        """Raise ValueError on a malformed input (called by __call__ before any compute)."""
        c = self.config
        shape, dtype = tuple(np.shape(input_features)), jnp.result_type(input_features)
        if len(shape) != 3:
            raise ValueError(f"WhisperEncoder: input_features must be [batch, n_mels, frames] "
                             f"(rank 3), got shape {shape}")
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"WhisperEncoder: input_features must be floating point log-mel, "
                             f"got dtype {dtype}")
        b, mels, frames = shape
        if mels != c.num_mel_bins:
            raise ValueError(f"WhisperEncoder: expected {c.num_mel_bins} mel bins (axis 1 of "
                             f"[batch, n_mels, frames]), got {mels}")
        if frames < 2 or frames % 2 or frames > c.max_frames:
            raise ValueError(f"WhisperEncoder: frames must be even and in [2, {c.max_frames}] "
                             f"(2 * max_source_positions), got {frames}")
        if frame_mask is not None and lengths is not None:
            raise ValueError("WhisperEncoder: pass at most one of frame_mask or lengths")
        if frame_mask is not None and tuple(np.shape(frame_mask)) != (b, frames):
            raise ValueError(f"WhisperEncoder: frame_mask must be [batch, frames] = "
                             f"{(b, frames)}, got {tuple(np.shape(frame_mask))}")
        if lengths is not None and tuple(np.shape(lengths)) != (b,):
            raise ValueError(f"WhisperEncoder: lengths must be [batch] = ({b},), got "
                             f"{tuple(np.shape(lengths))}")

    @nn.compact
    def __call__(self, input_features: jax.Array, frame_mask: jax.Array | None = None,
                 lengths: jax.Array | None = None) -> jax.Array:
        """input_features [batch, n_mels, frames] (HF layout); frames even, <= max_frames.

        frame_mask [batch, frames] bool or lengths [batch] (valid mel frames): padded frames
        are zeroed before each conv and excluded as attention keys, so valid outputs equal
        those of the unpadded input. Padded output rows are set to zero. Default: no mask (HF).
        """
        self.validate(input_features, frame_mask, lengths)
        c = self.config
        dt, pdt = parse_dtype(c.dtype), parse_dtype(c.param_dtype)
        frames = input_features.shape[-1]
        if lengths is not None:
            frame_mask = lengths_to_frame_mask(lengths, frames)
        x = jnp.swapaxes(input_features, 1, 2).astype(dt)  # [batch, frames, n_mels]
        if frame_mask is not None:
            x = x * frame_mask[..., None].astype(dt)
        x = jax.nn.gelu(self._conv("conv1", 1)(x), approximate=False)  # [batch, frames, d]
        if frame_mask is not None:
            x = x * frame_mask[..., None].astype(dt)
        x = jax.nn.gelu(self._conv("conv2", 2)(x), approximate=False)  # [batch, frames/2, d]
        t = x.shape[1]
        pos = self.param("embed_positions",
                         logical_init(lambda _k, s, d: jnp.asarray(sinusoids(*s), d),
                                      ("pos", "embed")),
                         (c.max_source_positions, c.d_model), pdt)
        x = constrain(x + pos[:t].astype(dt)[None], _ACT)  # [batch, t, d]
        mask = None
        out_mask = None
        if frame_mask is not None:
            out_mask = output_frame_mask(frame_mask)  # [batch, t]
            mask = out_mask[:, None, None, :]  # keys only: [batch, 1, 1, t]
        for i in range(c.encoder_layers):
            x = WhisperBlock(c, name=f"layers_{i}")(x, mask)
        x = LayerNorm(c.layer_norm_eps, dtype=dt, param_dtype=pdt, name="layer_norm")(x)
        if out_mask is not None:
            x = x * out_mask[..., None].astype(x.dtype)
        return x
