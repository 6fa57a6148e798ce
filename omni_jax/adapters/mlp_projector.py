"""2-layer MLP visual projector (LLaVA / OpenOmni; Capybara with 2x2 bilinear token reduction).

Also home of the small helpers every visual adapter shares: `AdapterConfig` (the adapters'
`omni_jax.config_base.StrictConfig`; `check_positive` / `check_choice` are re-exported from
there) and `check_patch_features` (the [batch, grid_h*grid_w, C] input contract).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.config_base import StrictConfig, check_choice, check_positive
from omni_jax.layers.common import constrain, logical_init, parse_dtype
from omni_jax.layers.interpolate import METHODS, resize_2d
from omni_jax.layers.mlp import GeluMLP, activation

ACT = ("act_batch", "act_len", "act_embed")
NEWLINE_MODES = ("none", "row", "end")


class AdapterConfig(StrictConfig):
    """Base of the adapters' frozen config dataclasses: dict round trip, strict keys."""


def check_patch_features(x: jax.Array, grid_hw: Sequence[int], who: str) -> tuple[int, int]:
    """Validate x [batch, grid_h*grid_w, C] against the static grid; returns (grid_h, grid_w)."""
    if len(grid_hw) != 2 or not all(isinstance(g, int | np.integer) and g > 0 for g in grid_hw):
        raise ValueError(f"{who}: grid_hw must be two positive static ints, got {grid_hw!r}")
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    if x.ndim != 3 or x.shape[1] != gh * gw:
        raise ValueError(f"{who}: expected patch features [batch, {gh}*{gw}={gh * gw}, channels] "
                         f"for grid {gh}x{gw}, got shape {tuple(x.shape)}")
    return gh, gw


@dataclasses.dataclass(frozen=True)
class MLPProjectorConfig(AdapterConfig):
    """Linear(C->D), act, Linear(D->D); optional grid resize by 1/reduce_factor before it
    (Capybara: factor 2, bilinear) and an optional learned image_newline."""

    out_dim: int = 64  # D, the LLM width
    reduce_factor: int = 1  # 1 = no reduction; 2 = 32x32 -> 16x16 (Capybara)
    reduce_method: str = "bilinear"  # torch F.interpolate mode, align_corners=False
    newline: str = "none"  # none | row (after every grid row, LLaVA-NeXT) | end (one per image)
    act: str = "gelu"
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_positive("MLPProjectorConfig", out_dim=self.out_dim,
                       reduce_factor=self.reduce_factor, init_std=self.init_std)
        check_choice("MLPProjectorConfig", "reduce_method", self.reduce_method, METHODS)
        check_choice("MLPProjectorConfig", "newline", self.newline, NEWLINE_MODES)
        activation(self.act)
        parse_dtype(self.dtype)
        parse_dtype(self.param_dtype)

    def reduced_hw(self, grid_h: int, grid_w: int) -> tuple[int, int]:
        """Token grid after the reduction (torch F.interpolate(size=(h//f, w//f)))."""
        f = self.reduce_factor
        if grid_h < f or grid_w < f:
            raise ValueError(f"MLPProjector: grid {grid_h}x{grid_w} is smaller than "
                             f"reduce_factor={f}; expected both sides >= {f}")
        return grid_h // f, grid_w // f


class MLPProjector(nn.Module):
    """Patch features [batch, gh*gw, C] -> LLM embeddings [batch, num_tokens(gh, gw), D]."""

    config: MLPProjectorConfig

    def num_tokens(self, grid_h: int, grid_w: int) -> int:
        h, w = self.config.reduced_hw(grid_h, grid_w)
        return h * w + {"none": 0, "row": h, "end": 1}[self.config.newline]

    @nn.compact
    def __call__(self, x: jax.Array, grid_hw: Sequence[int]) -> jax.Array:
        c = self.config
        gh, gw = check_patch_features(x, grid_hw, "MLPProjector")
        h, w = c.reduced_hw(gh, gw)
        dt, pdt = parse_dtype(c.dtype), parse_dtype(c.param_dtype)
        b = x.shape[0]
        if c.reduce_factor > 1:  # [batch, gh, gw, C] -> [batch, h, w, C]
            grid = resize_2d(x.reshape(b, gh, gw, -1), (h, w), method=c.reduce_method)
            x = grid.reshape(b, h * w, -1)
        x = constrain(x.astype(dt), ACT)
        y = GeluMLP(c.out_dim, c.act, c.init_std, dt, pdt, out_features=c.out_dim,
                    name="mlp")(x)  # [batch, h*w, D]
        if c.newline != "none":
            nl = self.param("image_newline",
                            logical_init(nn.initializers.normal(c.out_dim ** -0.5), ("embed",)),
                            (c.out_dim,), pdt).astype(dt)
            if c.newline == "row":
                rows = jnp.broadcast_to(nl, (b, h, 1, c.out_dim))
                y = jnp.concatenate([y.reshape(b, h, w, c.out_dim), rows], axis=2)
                y = y.reshape(b, h * (w + 1), c.out_dim)
            else:
                y = jnp.concatenate([y, jnp.broadcast_to(nl, (b, 1, c.out_dim))], axis=1)
        return constrain(y, ACT)
