"""Ola's learned image_begin / image_sep / image_newline / image_end vectors and token layouts.

Layouts (as Ola's released OlaMLP; pooled grids [h, w, D], NL after every row):
  image, one view:  [BEGIN] rows+NL [END]
  image, two views: [BEGIN] low-res rows+NL [SEP] high-res rows+NL [END]
  video:            [BEGIN] (frame rows+NL, [SEP]) for every frame [END]
The paper's summary writes the high-res rows without NEWLINE; the code appends it, so do we.
Init: N(0, std=1/sqrt(D)) — the code draws torch.randn(D) * 1/sqrt(D), i.e. a standard deviation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_jax.adapters.mlp_projector import AdapterConfig, check_positive
from omni_jax.layers.common import logical_init, parse_dtype

VECTORS = ("image_begin", "image_sep", "image_newline", "image_end")


@dataclasses.dataclass(frozen=True)
class OlaLayoutConfig(AdapterConfig):
    """Width of the learned layout vectors and their init std (None = 1/sqrt(dim))."""

    dim: int = 64
    init_std: float | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_positive("OlaLayoutConfig", dim=self.dim)
        if self.init_std is not None:
            check_positive("OlaLayoutConfig", init_std=self.init_std)
        parse_dtype(self.dtype)
        parse_dtype(self.param_dtype)

    @property
    def std(self) -> float:
        return self.dim ** -0.5 if self.init_std is None else self.init_std


def _hw(hw: Sequence[int], what: str) -> tuple[int, int]:
    if len(hw) != 2 or not all(isinstance(v, int) and v > 0 for v in hw):
        raise ValueError(f"Ola layout: {what} must be two positive ints (pooled h, w), got {hw!r}")
    return hw[0], hw[1]


def rows_num_tokens(hw: Sequence[int]) -> int:
    """Tokens of one pooled grid written row by row, each row followed by NEWLINE."""
    h, w = _hw(hw, "grid")
    return h * (w + 1)


def image_num_tokens(low_hw: Sequence[int], high_hw: Sequence[int] | None = None) -> int:
    """[BEGIN] low rows [SEP high rows] [END] for pooled grids low_hw (and high_hw)."""
    n = 2 + rows_num_tokens(low_hw)
    return n if high_hw is None else n + 1 + rows_num_tokens(high_hw)


def video_num_tokens(num_frames: int, hw: Sequence[int]) -> int:
    """[BEGIN] (rows + SEP) per frame [END] for num_frames pooled grids of size hw."""
    if not isinstance(num_frames, int) or num_frames <= 0:
        raise ValueError(f"Ola layout: num_frames must be a positive int, got {num_frames!r}")
    return 2 + num_frames * (rows_num_tokens(hw) + 1)


class OlaLayout(nn.Module):
    """Holds the four learned vectors [D] and writes pooled grids in Ola's layouts."""

    config: OlaLayoutConfig

    def setup(self) -> None:
        c = self.config
        init = logical_init(nn.initializers.normal(c.std), ("embed",))
        pdt = parse_dtype(c.param_dtype)
        self.begin = self.param("image_begin", init, (c.dim,), pdt)
        self.sep = self.param("image_sep", init, (c.dim,), pdt)
        self.newline = self.param("image_newline", init, (c.dim,), pdt)
        self.end = self.param("image_end", init, (c.dim,), pdt)

    def _vec(self, v: jax.Array, batch: int) -> jax.Array:  # -> [batch, 1, D]
        return jnp.broadcast_to(v.astype(parse_dtype(self.config.dtype)),
                                (batch, 1, self.config.dim))

    def rows(self, grid: jax.Array) -> jax.Array:
        """grid [batch, h, w, D] -> [batch, h*(w+1), D], NEWLINE after every row."""
        if grid.ndim != 4 or grid.shape[-1] != self.config.dim:
            raise ValueError(f"Ola layout: expected a pooled grid [batch, h, w, "
                             f"{self.config.dim}], got {tuple(grid.shape)}")
        b, h, w, d = grid.shape
        nl = jnp.broadcast_to(self.newline.astype(grid.dtype), (b, h, 1, d))
        return jnp.concatenate([grid, nl], axis=2).reshape(b, h * (w + 1), d)

    def image(self, low: jax.Array, high: jax.Array | None = None) -> jax.Array:
        """low [batch, h, w, D] (+ high [batch, h2, w2, D]) -> [batch, image_num_tokens, D]."""
        parts = [self.rows(low)]
        b = low.shape[0]
        if high is not None:
            if high.shape[0] != b:
                raise ValueError(f"Ola layout: views have batch {b} and {high.shape[0]}; "
                                 "expected the same images in both")
            parts += [self._vec(self.sep, b), self.rows(high)]
        parts = [self._vec(self.begin, b), *parts, self._vec(self.end, b)]
        return jnp.concatenate([p.astype(parts[1].dtype) for p in parts], axis=1)

    def video(self, frames: jax.Array) -> jax.Array:
        """frames [batch, T, h, w, D] -> [batch, video_num_tokens(T, (h, w)), D]."""
        if frames.ndim != 5:
            raise ValueError(f"Ola layout: expected pooled frames [batch, frames, h, w, D], got "
                             f"{tuple(frames.shape)}")
        b, t = frames.shape[:2]
        r = self.rows(frames.reshape(b * t, *frames.shape[2:]))  # [batch*T, h*(w+1), D]
        sep = self._vec(self.sep, b * t).astype(r.dtype)
        body = jnp.concatenate([r, sep], axis=1).reshape(b, -1, r.shape[-1])
        return jnp.concatenate([self._vec(self.begin, b).astype(r.dtype), body,
                                self._vec(self.end, b).astype(r.dtype)], axis=1)
