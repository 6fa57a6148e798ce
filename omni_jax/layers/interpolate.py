"""Separable 2-D resize that reproduces torch.nn.functional.interpolate (no antialias).

`jax.image.resize` differs from torch: its cubic kernel uses Keys a=-0.5 (torch: a=-0.75) and
it antialiases when downsampling. Checkpoints trained in torch (SigLIP position grids, 2x2
bilinear token reduction) need torch's exact arithmetic, so the interpolation weights are
built here in numpy at trace time (static shapes) and applied as two small matmuls.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("bilinear", "bicubic")
_CUBIC_A = -0.75  # torch's bicubic convolution constant


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """t [n] in [0, 1] -> [n, 4] weights of taps floor-1 .. floor+2 (as torch's cubic coeffs)."""
    a = _CUBIC_A
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731  |x| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731  1 < |x| < 2
    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def interp_matrix(in_size: int, out_size: int, method: str,
                  align_corners: bool = False) -> np.ndarray:
    """[out_size, in_size] float64 matrix M with resize(x) = M @ x along one axis (torch rules)."""
    if method not in METHODS:
        raise ValueError(f"unknown resize method {method!r}; expected one of {METHODS}")
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")
    dst = np.arange(out_size, dtype=np.float32)
    if align_corners:
        scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0)
        src = scale * dst
    else:  # torch computes the scale and source coordinate in float32 for float32 inputs
        scale = np.float32(in_size) / np.float32(out_size)
        src = scale * (dst + np.float32(0.5)) - np.float32(0.5)
        if method == "bilinear":
            src = np.maximum(src, np.float32(0))  # linear clamps at 0, cubic does not
    src = src.astype(np.float64)
    base = np.minimum(np.floor(src), in_size - 1).astype(np.int64)
    t = np.clip(src - base, 0.0, 1.0)
    if method == "bilinear":
        taps, weights = base[:, None] + np.arange(2), np.stack([1 - t, t], axis=-1)
    else:
        taps, weights = base[:, None] + np.arange(-1, 3), _cubic_weights(t)
    taps = np.clip(taps, 0, in_size - 1)  # border replication
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.repeat(np.arange(out_size), taps.shape[1]), taps.ravel()), weights.ravel())
    return m


def resize_2d(x: jax.Array, out_hw: Sequence[int], method: str = "bicubic",
              align_corners: bool = False) -> jax.Array:
    """Resize x [batch, h, w, channels] to [batch, out_h, out_w, channels] like torch's
    F.interpolate(mode=method, align_corners=align_corners, antialias=False) on NCHW.

    Computed in float32 (result cast back to x.dtype); sizes must be static Python ints.
    """
    if x.ndim != 4:
        raise ValueError(f"resize_2d expects x [batch, height, width, channels], got shape "
                         f"{tuple(x.shape)}")
    if len(out_hw) != 2 or not all(isinstance(s, int | np.integer) and s > 0 for s in out_hw):
        raise ValueError(f"resize_2d: out_hw must be two positive ints, got {out_hw!r}")
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    mh = jnp.asarray(interp_matrix(x.shape[1], out_h, method, align_corners), jnp.float32)
    mw = jnp.asarray(interp_matrix(x.shape[2], out_w, method, align_corners), jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("oh,bhwc->bowc", mh, x.astype(jnp.float32), precision=hi)
    y = jnp.einsum("pw,bowc->bopc", mw, y, precision=hi)  # [batch, out_h, out_w, channels]
    return y.astype(x.dtype)
