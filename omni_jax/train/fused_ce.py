"""Fused LM head + cross-entropy: chunked over tokens, gradients computed in the forward pass.

`fused_cross_entropy(hidden, kernel, targets, mask)` equals the naive
`log_softmax(hidden @ kernel)` token NLL summed over unmasked tokens, but

- the [tokens, vocab] logits exist one chunk of `chunk_size` tokens at a time, never whole;
- under differentiation the forward pass already produces d(hidden) and d(kernel) (the loss
  is a sum, so the backward pass only scales them by the incoming cotangent): no logits are
  saved or recomputed, and each chunk costs exactly the three matmuls of the naive path;
- the softmax gradient `softmax - onehot` is one elementwise pass (iota compare, no
  scatter-add), and the two gradient matmuls are written so XLA:CPU needs no transposed copy
  of the [tokens, vocab] gradient (the naive path's largest cost on CPU, see bench/README.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_F32 = jnp.float32


def _check(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, mask: jax.Array | None,
           tied: bool, chunk_size: int) -> tuple[int, int]:
    if hidden.ndim != 2:
        raise ValueError(f"fused_cross_entropy: hidden must be [tokens, embed], got {hidden.shape}")
    n, d = hidden.shape
    if kernel.ndim != 2:
        raise ValueError(f"fused_cross_entropy: kernel must be 2-D, got {kernel.shape}")
    kd = kernel.shape[1] if tied else kernel.shape[0]
    if kd != d:
        want = "[vocab, embed] (tied embedding)" if tied else "[embed, vocab]"
        raise ValueError(f"fused_cross_entropy: kernel {kernel.shape} must be {want} with "
                         f"embed={d} (hidden {hidden.shape})")
    if targets.shape != (n,) or not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"fused_cross_entropy: targets must be integer [{n}], got "
                         f"{targets.shape} {targets.dtype}")
    if mask is not None and mask.shape != (n,):
        raise ValueError(f"fused_cross_entropy: mask must be [{n}], got {mask.shape}")
    if chunk_size <= 0:
        raise ValueError(f"fused_cross_entropy: chunk_size must be positive, got {chunk_size}")
    return n, kernel.shape[0] if tied else kernel.shape[1]


def _chunk_logits(h: jax.Array, kernel: jax.Array, tied: bool) -> jax.Array:
    """h [chunk, embed] -> fp32 logits [chunk, vocab]."""
    dims = (((1,), (1,)), ((), ())) if tied else (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(h, kernel, dims, preferred_element_type=_F32)


def _tgt_logit(logits: jax.Array, t: jax.Array) -> jax.Array:
    """logits [chunk, vocab], t [chunk] -> logits[i, t[i]] (a gather, no one-hot)."""
    return jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]


def _chunk_nll(h, kernel, t, m, tied):
    """Masked NLL sum of one chunk, its fp32 logits [chunk, vocab] and logsumexp [chunk]."""
    logits = _chunk_logits(h, kernel, tied)  # [chunk, vocab]
    lse = jax.nn.logsumexp(logits, axis=-1)  # [chunk]
    return jnp.sum((lse - _tgt_logit(logits, t)) * m), logits, lse


def _split(x: jax.Array, n_chunks: int, chunk: int) -> jax.Array:
    pad = n_chunks * chunk - x.shape[0]
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(n_chunks, chunk, *x.shape[1:])


def _prepare(hidden, targets, mask, chunk_size):
    n = hidden.shape[0]
    chunk = min(chunk_size, n)
    n_chunks = -(-n // chunk)
    return (_split(hidden, n_chunks, chunk), _split(targets, n_chunks, chunk),
            _split(mask, n_chunks, chunk))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(hidden, kernel, targets, mask, tied, chunk_size):
    """-> fp32 masked NLL sum; mask fp32 [tokens], targets int32 [tokens]."""
    def body(acc, xs):
        h, t, m = xs
        return acc + _chunk_nll(h, kernel, t, m, tied)[0], None

    loss, _ = jax.lax.scan(body, jnp.zeros((), _F32), _prepare(hidden, targets, mask, chunk_size))
    return loss


def _chunk_grads(h, t, m, kernel, tied):
    """One chunk -> (masked NLL sum, d kernel [fp32], d h [chunk, embed], per-token NLL)."""
    nll_sum, logits, lse = _chunk_nll(h, kernel, t, m, tied)
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    p = jnp.exp(logits - lse[:, None])
    g = (jnp.where(iota == t[:, None], p - 1.0, p) * m[:, None]).astype(kernel.dtype)
    contract_tokens = (((0,), (0,)), ((), ()))
    if tied:  # kernel [vocab, embed]
        dh = jax.lax.dot_general(g, kernel, (((1,), (0,)), ((), ())),
                                 preferred_element_type=_F32)  # [chunk, embed]
        dk = jax.lax.dot_general(g, h, contract_tokens, preferred_element_type=_F32)
    else:  # kernel [embed, vocab]
        dh = jax.lax.dot_general(g, kernel, (((1,), (1,)), ((), ())),
                                 preferred_element_type=_F32)  # [chunk, embed]
        dk = jax.lax.dot_general(h, g, contract_tokens, preferred_element_type=_F32)
    return nll_sum, dk, dh.astype(h.dtype), lse - _tgt_logit(logits, t)


def _fused_fwd(hidden, kernel, targets, mask, tied, chunk_size):
    n = hidden.shape[0]
    hs, ts, ms = _prepare(hidden, targets, mask, chunk_size)
    # the first chunk initializes the accumulators: no zero-filled [embed, vocab] buffer
    loss, dk, dh0, nll0 = _chunk_grads(hs[0], ts[0], ms[0], kernel, tied)
    dhs, nlls = dh0[None], nll0[None]
    if hs.shape[0] > 1:
        def body(carry, xs):
            s, k, dh, nll = _chunk_grads(*xs, kernel, tied)
            return (carry[0] + s, carry[1] + k), (dh, nll)

        (loss, dk), (rest_dh, rest_nll) = jax.lax.scan(body, (loss, dk), (hs[1:], ts[1:], ms[1:]))
        dhs = jnp.concatenate([dhs, rest_dh])
        nlls = jnp.concatenate([nlls, rest_nll])
    dh = dhs.reshape(-1, hidden.shape[1])[:n]
    nll = nlls.reshape(-1)[:n]  # d loss / d mask
    return loss, (dh, dk.astype(kernel.dtype), nll, targets.shape)


def _fused_bwd(tied, chunk_size, res, ct):
    dh, dk, nll, t_shape = res
    return ((dh * ct).astype(dh.dtype), (dk * ct).astype(dk.dtype),
            np.zeros(t_shape, jax.dtypes.float0), nll * ct)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                        mask: jax.Array | None = None, *, tied: bool = False,
                        chunk_size: int = 1024) -> tuple[jax.Array, jax.Array]:
    """LM head + token NLL without whole [tokens, vocab] logits or logit gradients.

    hidden [tokens, embed] (final-normed); kernel [embed, vocab] (lm_head), or the embedding
    table [vocab, embed] with tied=True; targets [tokens] int (already shifted); mask [tokens]
    (0 = ignore; float weights allowed) or None. Returns fp32 (loss_sum, count): the masked
    NLL sum and sum(mask); mean loss = loss_sum / max(count, 1). Differentiable in hidden and
    kernel; gradients equal the naive logits -> log_softmax path.
    """
    _check(hidden, kernel, targets, mask, tied, chunk_size)
    m = jnp.ones(targets.shape, _F32) if mask is None else mask.astype(_F32)
    loss = _fused(hidden, kernel, targets.astype(jnp.int32), m, tied, chunk_size)
    return loss, jnp.sum(m)
