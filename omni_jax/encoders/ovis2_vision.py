"""Ovis2's vision transformer (AIMv2-style, transformers' Ovis2VisionTransformer).

Differs from encoders/vision.py's SigLIP tower in ways its config cannot express: an RMSNorm
right after the patch conv (before the positions are added), RMSNorm pre-norms, a gated
(SwiGLU-style) MLP, optional biases on the attention / MLP projections (qkv_bias, mlp_bias,
off in Ovis2) and a final RMSNorm. The learned position table covers the native grid only
(no interpolation: transformers adds all `num_patches` rows), so inputs must be image_size.

pixel_values [batch, S, S, channels] (NHWC) -> [batch, (S // p)^2, hidden], row-major patches;
what the Ovis visual tokenizer head (adapters.ovis_vte) consumes.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_jax.config_base import StrictConfig, check_positive
from omni_jax.layers.attention import Attention
from omni_jax.layers.common import constrain, logical_init, parse_dtype
from omni_jax.layers.mlp import activation
from omni_jax.layers.norms import RMSNorm

_ACT = ("act_batch", "act_len", "act_embed")


@dataclasses.dataclass(frozen=True)
class Ovis2ViTConfig(StrictConfig):
    """Hyper-parameters of the Ovis2 vision backbone (HF Ovis2VisionConfig names, with
    num_layers / num_heads as in SiglipVisionConfig)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_channels: int = 3
    image_size: int = 32  # the only accepted input side (the position table is not resized)
    patch_size: int = 8
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False  # biases of q, k, v and the output projection
    mlp_bias: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_positive("Ovis2ViTConfig", hidden_size=self.hidden_size,
                       intermediate_size=self.intermediate_size, num_layers=self.num_layers,
                       num_heads=self.num_heads, num_channels=self.num_channels,
                       image_size=self.image_size, patch_size=self.patch_size,
                       rms_norm_eps=self.rms_norm_eps, initializer_range=self.initializer_range)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"Ovis2ViTConfig: hidden_size={self.hidden_size} is not divisible "
                             f"by num_heads={self.num_heads}")
        if self.image_size < self.patch_size:
            raise ValueError(f"Ovis2ViTConfig: image_size={self.image_size} is smaller than "
                             f"patch_size={self.patch_size}")
        activation(self.hidden_act)
        parse_dtype(self.dtype)
        parse_dtype(self.param_dtype)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def native_grid(self) -> int:
        return self.image_size // self.patch_size

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid of an input; only image_size x image_size images are accepted."""
        if (height, width) != (self.image_size, self.image_size):
            raise ValueError(f"Ovis2 vision tower: image size {height}x{width} must be the native "
                             f"{self.image_size}x{self.image_size} (its position table is fixed)")
        return self.native_grid, self.native_grid

    def num_patches(self, height: int, width: int) -> int:
        gh, gw = self.grid(height, width)
        return gh * gw


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), optional biases (Ovis2MLP)."""

    hidden: int
    act: str = "silu"
    use_bias: bool = False
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [batch, tokens, embed]
        init = nn.initializers.normal(self.init_std)
        dense = lambda n, names, name: nn.Dense(  # noqa: E731
            n, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=logical_init(init, names),
            bias_init=logical_init(nn.initializers.zeros, names[1:]), name=name)
        gate = dense(self.hidden, ("embed", "mlp"), "gate")(x)  # [batch, tokens, mlp]
        up = dense(self.hidden, ("embed", "mlp"), "up")(x)
        h = constrain(activation(self.act)(gate) * up, ("act_batch", "act_len", "act_mlp"))
        return dense(x.shape[-1], ("mlp", "embed"), "down")(h)


class Ovis2ViTBlock(nn.Module):
    """x + attn(rms1(x)); x + mlp(rms2(x)); bidirectional, no rope."""

    config: Ovis2ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [batch, patches, embed]
        c = self.config
        dt, pdt = parse_dtype(c.dtype), parse_dtype(c.param_dtype)
        h = RMSNorm(c.rms_norm_eps, dt, pdt, name="attn_norm")(x)
        b = c.qkv_bias
        h, _ = Attention(c.num_heads, c.num_heads, c.head_dim, q_bias=b, k_bias=b, v_bias=b,
                         o_bias=b, init_std=c.initializer_range, dtype=dt, param_dtype=pdt,
                         name="attn")(h)
        x = constrain(x + h, _ACT)
        h = RMSNorm(c.rms_norm_eps, dt, pdt, name="mlp_norm")(x)
        h = GatedMLP(c.intermediate_size, c.hidden_act, c.mlp_bias, c.initializer_range, dt, pdt,
                     name="mlp")(h)
        return constrain(x + h, _ACT)


class Ovis2VisionEncoder(nn.Module):
    """pixel_values [batch, S, S, channels] -> final-RMSNormed features [batch, (S/p)^2, C]."""

    config: Ovis2ViTConfig

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return self.config.grid(height, width)

    def _check(self, pixel_values: jax.Array) -> tuple[int, int]:
        c, shape = self.config, tuple(pixel_values.shape)
        if len(shape) != 4 or shape[-1] != c.num_channels:
            raise ValueError(f"Ovis2VisionEncoder: pixel_values must be [batch, height, width, "
                             f"{c.num_channels}] (NHWC), got shape {shape}")
        if not jnp.issubdtype(pixel_values.dtype, jnp.floating):
            raise ValueError(f"Ovis2VisionEncoder: pixel_values must be float, got dtype "
                             f"{pixel_values.dtype}")
        return c.grid(shape[1], shape[2])

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        rows, cols = self._check(pixel_values)
        c = self.config
        dt, pdt = parse_dtype(c.dtype), parse_dtype(c.param_dtype)
        init = nn.initializers.normal(c.initializer_range)
        x = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size,) * 2,
                    padding="VALID", dtype=dt, param_dtype=pdt,
                    kernel_init=logical_init(init, (None, None, "conv", "embed")),
                    bias_init=logical_init(nn.initializers.zeros, ("embed",)),
                    name="patch_embed")(pixel_values.astype(dt))  # [batch, rows, cols, embed]
        x = x.reshape(x.shape[0], rows * cols, c.hidden_size)  # [batch, patches, embed]
        x = RMSNorm(c.rms_norm_eps, dt, pdt, name="patch_norm")(x)
        table = self.param("pos_embed", logical_init(init, ("pos", "embed")),
                           (rows * cols, c.hidden_size), pdt)  # [patches, embed]
        x = constrain(x + table.astype(dt)[None], _ACT)
        for i in range(c.num_layers):
            x = Ovis2ViTBlock(c, name=f"layers_{i}")(x)
        return constrain(RMSNorm(c.rms_norm_eps, dt, pdt, name="post_norm")(x), _ACT)
