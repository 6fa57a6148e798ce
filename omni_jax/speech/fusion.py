"""Text-guided fusion (OpenOmni): response-text queries cross-attend to the expanded LLM states."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_jax.layers.attention import dot_product_attention
from omni_jax.layers.common import constrain, logical_init
from omni_jax.layers.norms import LayerNorm

_ACT = ("act_batch", "act_len", "act_embed")


def _dense(features: Any, names: tuple, init_std: float, dtype: Any, param_dtype: Any,
           name: str, axis: Any = -1) -> nn.DenseGeneral:
    return nn.DenseGeneral(features, axis=axis, use_bias=False, dtype=dtype,
                           param_dtype=param_dtype, name=name,
                           kernel_init=logical_init(nn.initializers.normal(init_std), names))


class CrossAttention(nn.Module):
    """to_out(softmax(q k^T / sqrt(d)) v), q from LN(queries), k|v from LN(keys); no biases."""

    heads: int
    head_dim: int
    eps: float = 1e-5
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, keys: jax.Array, key_mask: jax.Array) -> jax.Array:
        """x [batch, seq, embed]; keys [batch, keys, embed]; key_mask [batch, keys] bool."""
        (b, s, n), k_len = x.shape, keys.shape[1]
        h, hd = self.heads, self.head_dim
        norm = lambda name: LayerNorm(self.eps, True, self.dtype, self.param_dtype,  # noqa: E731
                                      name=name)
        xq = norm("norm_q")(x).reshape(b * s, n)
        xk = norm("norm_kv")(keys).reshape(b * k_len, n)
        q = _dense((h, hd), ("embed", "heads", "head_dim"), self.init_std, self.dtype,
                   self.param_dtype, "to_q")(xq).reshape(b, s, h, hd)
        kv = _dense((2, h, hd), ("embed", None, "heads", "head_dim"), self.init_std, self.dtype,
                    self.param_dtype, "to_kv")(xk).reshape(b, k_len, 2, h, hd)
        out = dot_product_attention(q, kv[:, :, 0], kv[:, :, 1], key_mask[:, None, None, :])
        out = constrain(out, ("act_batch", "act_len", "act_heads", None))  # [b, s, heads, hd]
        y = _dense(n, ("heads", "head_dim", "embed"), self.init_std, self.dtype, self.param_dtype,
                   "to_out", axis=(-2, -1))(out.reshape(b * s, h, hd))
        return y.reshape(b, s, n)


class FeedForward(nn.Module):
    """fc2(gelu(fc1(LN(x)))) with exact (erf) GELU, no biases."""

    mult: int
    eps: float = 1e-5
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [batch, seq, embed]
        lead, n = x.shape[:-1], x.shape[-1]
        h = LayerNorm(self.eps, True, self.dtype, self.param_dtype, name="norm")(x)
        h = _dense(self.mult * n, ("embed", "mlp"), self.init_std, self.dtype, self.param_dtype,
                   "fc1")(h.reshape(-1, n))
        h = constrain(jax.nn.gelu(h, approximate=False), (None, "act_mlp"))
        h = _dense(n, ("mlp", "embed"), self.init_std, self.dtype, self.param_dtype, "fc2")(h)
        return h.reshape(*lead, n)


class FusionBlock(nn.Module):
    """x + attn(x, keys), then + ff(.)."""

    heads: int
    head_dim: int
    ff_mult: int
    eps: float = 1e-5
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, keys: jax.Array, key_mask: jax.Array) -> jax.Array:
        kw = dict(eps=self.eps, init_std=self.init_std, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        x = x + CrossAttention(self.heads, self.head_dim, name="attn", **kw)(x, keys, key_mask)
        return constrain(x + FeedForward(self.ff_mult, name="ff", **kw)(x), _ACT)


class TextFusion(nn.Module):
    """`layers` x (q += CrossAttention(q, keys); q += FF(q)), then LayerNorm; no positions."""

    layers: int
    heads: int
    head_dim: int
    ff_mult: int
    eps: float = 1e-5
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, keys: jax.Array, key_mask: jax.Array) -> jax.Array:
        """x [batch, seq, embed] text queries; keys [batch, keys, embed] -> [batch, seq, embed]."""
        x = x.astype(self.dtype)
        for i in range(self.layers):
            x = FusionBlock(self.heads, self.head_dim, self.ff_mult, self.eps, self.init_std,
                            self.dtype, self.param_dtype, name=f"layers_{i}")(x, keys, key_mask)
        return LayerNorm(self.eps, True, self.dtype, self.param_dtype, name="norm")(x)
