"""Multi-head / grouped-query attention with optional biases, RoPE, masks and a KV cache."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_jax.layers.common import constrain, logical_init
from omni_jax.layers.rope import apply_rope, rope_cos_sin

KVCache = dict[str, jax.Array]  # {"k": [batch, max_len, kv_heads, head_dim], "v": same}


def causal_segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[batch, seq] segment ids (0 = padding) -> [batch, 1, seq, seq] bool mask.

    A query attends to earlier-or-equal keys of its own segment; padding keys are masked. With
    packed sequences this keeps examples from seeing each other.
    """
    seq = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    valid = (segment_ids != 0)[:, None, :]
    return (causal[None] & same & valid)[:, None]


def cache_mask(key_valid: jax.Array, index: jax.Array, seq: int) -> jax.Array:
    """Mask for `seq` new queries written at slots index..index+seq-1 of a cache.

    key_valid: [batch, max_len] bool (slots holding real tokens) -> [batch, 1, seq, max_len].
    """
    max_len = key_valid.shape[-1]
    q_slot = index + jnp.arange(seq)[:, None]  # [seq, 1]
    causal = jnp.arange(max_len)[None, :] <= q_slot  # [seq, max_len]
    return (causal[None] & key_valid[:, None, :])[:, None]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v with GQA; the math of jax.nn.dot_product_attention (XLA path).

    q [batch, seq, heads, d]; k, v [batch, keys, kv_heads, d]; mask broadcastable to
    [batch, heads, seq, keys] (True = keep). Scores in float32, masked with a large finite
    negative (fully masked rows become uniform, never NaN), softmax in float32. Differs only
    in layout: heads are moved in front once so both matmuls are plain batched GEMMs, which
    on CPU is 1.5-1.7x faster than jax.nn's vmapped version (fewer score transposes).
    """
    b, s, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    qg = jnp.transpose(q.reshape(b, s, kvh, g, d), (0, 2, 3, 1, 4))  # [b, kv, g, seq, d]
    kt = jnp.transpose(k, (0, 2, 1, 3))  # [b, kv, keys, d]
    vt = jnp.transpose(v, (0, 2, 1, 3))
    scores = jnp.einsum("bkgsd,bktd->bkgst", qg, kt, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(d ** -0.5)
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        mb, mh, ms, mt = mask.shape
        mask = mask[:, :, None] if mh == 1 else mask.reshape(mb, kvh, g, ms, mt)
        scores = jnp.where(mask, scores, jnp.float32(-0.7 * jnp.finfo(jnp.float32).max))
    probs = jax.nn.softmax(scores, axis=-1).astype(k.dtype)  # [b, kv, g, seq, keys]
    out = jnp.einsum("bkgst,bktd->bkgsd", probs, vt)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, s, h, d)


def init_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int,
               num_layers: int, dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    """An empty KV cache for a stack of layers; `index` is the next slot to write."""
    shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "valid": jnp.zeros((batch, max_len), bool), "index": jnp.zeros((), jnp.int32)}


class Attention(nn.Module):
    """Self-attention; num_heads % num_kv_heads == 0 gives GQA (validated by the owning config)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_bias: bool = False
    k_bias: bool = False
    v_bias: bool = False
    o_bias: bool = False
    rope_theta: float | None = None
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _proj(self, heads: int, bias: bool, name: str) -> nn.Module:
        hd = "heads" if name == "q" else "kv_heads"
        return nn.DenseGeneral(
            (heads, self.head_dim), use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=logical_init(nn.initializers.normal(self.init_std),
                                     ("embed", hd, "head_dim")),
            bias_init=logical_init(nn.initializers.zeros, (hd, "head_dim")), name=name)

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None,
                 positions: jax.Array | None = None, kv: KVCache | None = None,
                 index: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """x [batch, seq, embed]; mask broadcastable to [batch, heads, seq, keys] (True = keep).

        With `kv` (this layer's cache) the new keys/values are written at slot `index` and the
        queries attend over the whole cache; the updated cache is returned.
        """
        # projections on [batch * seq, embed]: their kernel gradients then contract one axis,
        # which XLA:CPU runs without transposed copies of the activations (see bench/README.md)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        q = self._proj(self.num_heads, self.q_bias, "q")(x2).reshape(
            *lead, self.num_heads, self.head_dim)  # [batch, seq, heads, head_dim]
        k = self._proj(self.num_kv_heads, self.k_bias, "k")(x2).reshape(
            *lead, self.num_kv_heads, self.head_dim)  # [batch, seq, kv_heads, head_dim]
        v = self._proj(self.num_kv_heads, self.v_bias, "v")(x2).reshape(
            *lead, self.num_kv_heads, self.head_dim)
        if self.rope_theta is not None:
            if positions is None:
                raise ValueError("rotary attention needs positions [batch, seq]")
            cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = constrain(q, ("act_batch", "act_len", "act_heads", None))
        if kv is not None:
            start = (0, index, 0, 0)
            kv = {"k": jax.lax.dynamic_update_slice(kv["k"], k.astype(kv["k"].dtype), start),
                  "v": jax.lax.dynamic_update_slice(kv["v"], v.astype(kv["v"].dtype), start)}
            k, v = kv["k"].astype(self.dtype), kv["v"].astype(self.dtype)
        out = dot_product_attention(q, k, v, mask)  # [batch, seq, heads, head_dim]
        out = constrain(out, ("act_batch", "act_len", "act_heads", None))
        y = nn.DenseGeneral(
            x.shape[-1], axis=(-2, -1), use_bias=self.o_bias, dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical_init(nn.initializers.normal(self.init_std),
                                     ("heads", "head_dim", "embed")),
            bias_init=logical_init(nn.initializers.zeros, ("embed",)), name="o")(
                out.reshape(-1, *out.shape[-2:]))
        return y.reshape(x.shape), kv
