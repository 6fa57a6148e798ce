"""Ola's local-global attention pooling (LGAP) and the "ola_mlp" projector built around it.

LGAP, per non-overlapping k x k window (Ola: k = 2) with features f_1..f_{k^2} in R^C and their
mean g:  s_i = W2 act(W1 [f_i ; g])  (W1: 2C -> C, W2: C -> C, with biases as in Ola's code),
pi = softmax over the window positions i, separately per channel;  out = sum_i pi_i * f_i.

ola_mlp (Ola's code): Linear(C_vis -> D), LGAP on D, GELU, Linear(D -> D), then the learned
begin/newline/sep/end layout (ola_layout.py). Odd grids are an error, not padded: Ola pads images
to a multiple of 32 px (two 16 px patches), so its grids are always even, and its reshape fails
on odd ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_jax.adapters.mlp_projector import (
    ACT,
    AdapterConfig,
    check_patch_features,
    check_positive,
)
from omni_jax.adapters.ola_layout import (
    OlaLayout,
    OlaLayoutConfig,
    image_num_tokens,
    video_num_tokens,
)
from omni_jax.layers.common import constrain, logical_init, parse_dtype
from omni_jax.layers.mlp import activation


@dataclasses.dataclass(frozen=True)
class LGAPConfig(AdapterConfig):
    """Window size and predictor settings of LGAP (Ola: window 2, exact GELU, biases)."""

    window: int = 2
    act: str = "gelu"
    use_bias: bool = True
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_positive("LGAPConfig", window=self.window, init_std=self.init_std)
        activation(self.act)
        parse_dtype(self.dtype)
        parse_dtype(self.param_dtype)

    def pooled_hw(self, grid_h: int, grid_w: int) -> tuple[int, int]:
        k = self.window
        if grid_h % k or grid_w % k:
            raise ValueError(f"LGAP: grid {grid_h}x{grid_w} is not divisible by the {k}x{k} "
                             f"window; expected both sides to be multiples of {k} (Ola pads "
                             f"images so the patch grid is even)")
        return grid_h // k, grid_w // k


def windows(x: jax.Array, k: int) -> jax.Array:
    """[batch, h, w, C] -> [batch, h/k, w/k, k*k, C], window positions in row-major order."""
    b, h, w, ch = x.shape
    x = x.reshape(b, h // k, k, w // k, k, ch).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // k, w // k, k * k, ch)


class LGAP(nn.Module):
    """Local-global attention pooling of a grid [batch, h, w, C] -> [batch, h/k, w/k, C]."""

    config: LGAPConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        if x.ndim != 4:
            raise ValueError(f"LGAP expects a grid [batch, h, w, channels], got {tuple(x.shape)}")
        c.pooled_hw(x.shape[1], x.shape[2])
        dt, pdt = parse_dtype(c.dtype), parse_dtype(c.param_dtype)
        ch = x.shape[-1]
        f = windows(x.astype(dt), c.window)  # [batch, h', w', k*k, C]
        g = jnp.broadcast_to(jnp.mean(f, axis=-2, keepdims=True), f.shape)
        dense = lambda names, name: nn.Dense(  # noqa: E731
            ch, use_bias=c.use_bias, dtype=dt, param_dtype=pdt,
            kernel_init=logical_init(nn.initializers.normal(c.init_std), names),
            bias_init=logical_init(nn.initializers.zeros, names[-1:]), name=name)
        s = dense(("embed", "mlp"), "w1")(jnp.concatenate([f, g], axis=-1))  # [..., k*k, C]
        s = dense(("mlp", "embed"), "w2")(activation(c.act)(s))
        pi = jax.nn.softmax(s.astype(jnp.float32), axis=-2)  # over window positions, per channel
        return jnp.sum(pi * f.astype(jnp.float32), axis=-2).astype(dt)


@dataclasses.dataclass(frozen=True)
class OlaProjectorConfig(AdapterConfig):
    """Ola's "ola_mlp": Linear(C->D), LGAP, act, Linear(D->D), begin/newline/sep/end layout."""

    out_dim: int = 64  # D, the LLM width
    window: int = 2
    act: str = "gelu"  # both the LGAP predictor's and the projector's (Ola: nn.GELU, exact)
    use_bias: bool = True  # proj1/proj2 and the LGAP predictor (Ola: nn.Linear defaults)
    layout: bool = True  # False: return the pooled tokens only (rows flattened)
    init_std: float = 0.02
    vector_std: float | None = None  # layout vectors; None = 1/sqrt(D) as Ola's code
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_positive("OlaProjectorConfig", out_dim=self.out_dim)
        self.lgap_config()
        if self.layout:
            self.layout_config()

    def lgap_config(self) -> LGAPConfig:
        return LGAPConfig(self.window, self.act, self.use_bias, self.init_std, self.dtype,
                          self.param_dtype)

    def layout_config(self) -> OlaLayoutConfig:
        return OlaLayoutConfig(self.out_dim, self.vector_std, self.dtype, self.param_dtype)


class OlaProjector(nn.Module):
    """Patch features [batch, gh*gw, C] (+ optional second view) -> [batch, n, D] (Ola)."""

    config: OlaProjectorConfig

    def setup(self) -> None:
        c = self.config
        dt, pdt = parse_dtype(c.dtype), parse_dtype(c.param_dtype)
        dense = lambda names, name: nn.Dense(  # noqa: E731
            c.out_dim, use_bias=c.use_bias, dtype=dt, param_dtype=pdt,
            kernel_init=logical_init(nn.initializers.normal(c.init_std), names),
            bias_init=logical_init(nn.initializers.zeros, names[-1:]), name=name)
        self.proj1 = dense(("embed", "mlp"), "proj1")
        self.pooler = LGAP(c.lgap_config(), name="pooler")
        self.proj2 = dense(("mlp", "embed"), "proj2")
        if c.layout:
            self.vectors = OlaLayout(c.layout_config(), name="vectors")

    def pooled_hw(self, grid_h: int, grid_w: int) -> tuple[int, int]:
        return self.config.lgap_config().pooled_hw(grid_h, grid_w)

    def num_tokens(self, grid_h: int, grid_w: int,
                   grid2_hw: Sequence[int] | None = None) -> int:
        """Tokens for one image (optionally with its second, high-res view's patch grid)."""
        low = self.pooled_hw(grid_h, grid_w)
        if not self.config.layout:
            return low[0] * low[1] + (0 if grid2_hw is None else
                                      _area(self.pooled_hw(*grid2_hw)))
        high = None if grid2_hw is None else self.pooled_hw(*grid2_hw)
        return image_num_tokens(low, high)

    def video_num_tokens(self, num_frames: int, grid_h: int, grid_w: int) -> int:
        hw = self.pooled_hw(grid_h, grid_w)
        return video_num_tokens(num_frames, hw) if self.config.layout else num_frames * _area(hw)

    def pool(self, x: jax.Array, grid_hw: Sequence[int]) -> jax.Array:
        """[batch, gh*gw, C] -> pooled, projected grid [batch, gh/k, gw/k, D]."""
        gh, gw = check_patch_features(x, grid_hw, "OlaProjector")
        self.pooled_hw(gh, gw)
        h = self.proj1(x.reshape(x.shape[0], gh, gw, x.shape[-1]))  # [batch, gh, gw, D]
        h = self.pooler(h)  # [batch, gh/k, gw/k, D]
        return self.proj2(activation(self.config.act)(h))

    def __call__(self, x: jax.Array, grid_hw: Sequence[int], x2: jax.Array | None = None,
                 grid2_hw: Sequence[int] | None = None) -> jax.Array:
        """x: low-res view [batch, gh*gw, C]; x2 (optional): high-res view of the same images."""
        if (x2 is None) != (grid2_hw is None):
            raise ValueError("OlaProjector: pass x2 and grid2_hw together (second image view)")
        if x2 is not None and x2.shape[0] != x.shape[0]:
            raise ValueError(f"OlaProjector: the two views need the same batch, got "
                             f"{x.shape[0]} and {x2.shape[0]}")
        low = self.pool(x, grid_hw)
        high = None if x2 is None else self.pool(x2, grid2_hw)
        if self.config.layout:
            return constrain(self.vectors.image(low, high), ACT)
        flat = [g.reshape(g.shape[0], -1, g.shape[-1]) for g in (low, high) if g is not None]
        return constrain(jnp.concatenate(flat, axis=1), ACT)

    def video(self, frames: jax.Array, grid_hw: Sequence[int]) -> jax.Array:
        """frames [batch, T, gh*gw, C] -> [batch, video_num_tokens(T, gh, gw), D]."""
        if frames.ndim != 4:
            raise ValueError(f"OlaProjector.video expects frames [batch, frames, patches, "
                             f"channels], got {tuple(frames.shape)}")
        b, t = frames.shape[:2]
        g = self.pool(frames.reshape(b * t, *frames.shape[2:]), grid_hw)
        g = g.reshape(b, t, *g.shape[1:])  # [batch, T, h, w, D]
        if self.config.layout:
            return constrain(self.vectors.video(g), ACT)
        return constrain(g.reshape(b, -1, g.shape[-1]), ACT)


def _area(hw: Sequence[int]) -> int:
    return hw[0] * hw[1]
