"""Autoregressive generation with a KV cache: one jitted prefill, one jitted decode loop.

The prompt may be right- or left-padded (attention_mask 1 = token, 0 = pad). Positions come
from the mask (cumsum - 1, as Hugging Face does), pads are never attended to, and every row
behaves exactly as if it had been generated alone.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_jax.config_base import StrictConfig
from omni_jax.layers.attention import init_cache
from omni_jax.layers.common import parse_dtype


@dataclasses.dataclass(frozen=True)
class SamplingConfig(StrictConfig):
    """How the next token is picked; greedy ignores the other fields."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"SamplingConfig.temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be an integer >= 0 (0 disables), got "
                             f"{self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p!r}")



def sample_logits(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """float logits [batch, vocab] -> token ids [batch] (greedy, or temperature/top-k/top-p)."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]  # [batch, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token while the mass strictly before it is < top_p (the top token always stays).
        before = jnp.cumsum(probs, axis=-1) - probs
        keep = before < sampling.top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _check_args(model: nn.Module, input_ids: Any, attention_mask: Any,
                max_new_tokens: int) -> None:
    cfg = model.config
    if getattr(input_ids, "ndim", None) != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"generate: input_ids must be an integer array [batch, prompt_len], got "
                         f"{getattr(input_ids, 'shape', type(input_ids))}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"generate: attention_mask shape {tuple(attention_mask.shape)} must equal "
                         f"input_ids shape {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    total = input_ids.shape[1] + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(f"generate: prompt_len {input_ids.shape[1]} + max_new_tokens "
                         f"{max_new_tokens} = {total} exceeds max_position_embeddings "
                         f"{cfg.max_position_embeddings}")


@functools.partial(jax.jit, static_argnames=("model", "max_len", "cache_dtype"))
def _prefill(model: nn.Module, params: Any, input_ids: jax.Array, mask: jax.Array, *,
             max_len: int, cache_dtype: Any) -> tuple[jax.Array, dict, jax.Array]:
    """Run the prompt once, filling the cache; logits only at each row's last real token."""
    c = model.config
    b, p = input_ids.shape
    cache = init_cache(b, max_len, c.num_kv_heads, c.head_dim, c.num_layers, cache_dtype)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)  # [batch, prompt]
    out = model.apply(params, input_ids, positions=positions, segment_ids=mask, cache=cache,
                      compute_logits=False)
    last = p - 1 - jnp.argmax(mask[:, ::-1], axis=-1)  # index of the last real token [batch]
    hidden = jnp.take_along_axis(out["hidden"], last[:, None, None], axis=1)  # [batch, 1, embed]
    logits = model.apply(params, hidden, method=type(model).logits)[:, 0]  # [batch, vocab]
    return logits, out["cache"], jnp.sum(mask, axis=-1)  # next position = real-token count


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "eos_id",
                                             "pad_id", "return_logits"))
def _decode(model: nn.Module, params: Any, logits: jax.Array, cache: dict, next_pos: jax.Array,
            rng: jax.Array, *, max_new_tokens: int, sampling: SamplingConfig, eos_id: int | None,
            pad_id: int, return_logits: bool) -> dict[str, jax.Array]:
    """Sample, feed back, repeat: a while_loop over one compiled step; stops when all hit EOS."""
    b, vocab = logits.shape
    tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    all_logits = jnp.zeros((b, max_new_tokens, vocab) if return_logits else (0,), jnp.float32)
    done = jnp.zeros((b,), bool)

    def emit(t, logits, tokens, all_logits, done, rng):
        rng, key = jax.random.split(rng)
        tok = jnp.where(done, pad_id, sample_logits(logits, key, sampling))
        tokens = tokens.at[:, t].set(tok)
        if return_logits:
            all_logits = all_logits.at[:, t].set(logits.astype(jnp.float32))
        if eos_id is not None:
            done = done | (tok == eos_id)
        return tok, tokens, all_logits, done, rng

    def cond(state):
        t, done = state[0], state[5]
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(state):
        t, tok, cache, tokens, all_logits, done, rng = state
        out = model.apply(params, tok[:, None], positions=(next_pos + t - 1)[:, None],
                          cache=cache)  # one token per row
        tok, tokens, all_logits, done, rng = emit(t, out["logits"][:, 0], tokens, all_logits,
                                                  done, rng)
        return t + 1, tok, out["cache"], tokens, all_logits, done, rng

    tok, tokens, all_logits, done, rng = emit(0, logits, tokens, all_logits, done, rng)
    state = (jnp.ones((), jnp.int32), tok, cache, tokens, all_logits, done, rng)
    t, _, _, tokens, all_logits, done, _ = jax.lax.while_loop(cond, body, state)
    out = {"tokens": tokens, "done": done, "steps": t}
    if return_logits:
        out["logits"] = all_logits
    return out


def generate(model: nn.Module, params: Any, input_ids: jax.Array,
             attention_mask: jax.Array | None = None, *, max_new_tokens: int,
             eos_id: int | None = None, pad_id: int = 0,
             sampling: SamplingConfig | None = None, rng: jax.Array | None = None,
             cache_dtype: str | Any = "float32",
             return_logits: bool = False) -> dict[str, jax.Array]:
    """Generate up to `max_new_tokens` after a (padded) prompt with a `Decoder`.

    input_ids / attention_mask: [batch, prompt_len], right- or left-padded (mask 1 = token).
    Returns {"tokens": [batch, max_new_tokens] int32 (pad_id after a row's EOS and past
    "steps"), "done": [batch] bool (row emitted EOS), "steps": number of decode steps run,
    "logits": [batch, max_new_tokens, vocab] float32 scores when return_logits}.
    """
    sampling = SamplingConfig() if sampling is None else sampling
    if not isinstance(sampling, SamplingConfig):
        raise ValueError(f"generate: sampling must be a SamplingConfig, got {type(sampling)}")
    _check_args(model, input_ids, attention_mask, max_new_tokens)
    vocab = model.config.vocab_size
    for name, tid in (("eos_id", eos_id), ("pad_id", pad_id)):
        if tid is not None and not 0 <= tid < vocab:
            raise ValueError(f"generate: {name}={tid} is outside the vocabulary [0, {vocab})")
    if not sampling.greedy and rng is None:
        raise ValueError("generate: sampling (greedy=False) needs an rng key")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = (jnp.ones_like(input_ids) if attention_mask is None
            else jnp.asarray(attention_mask).astype(jnp.int32))
    max_len = input_ids.shape[1] + max_new_tokens
    logits, cache, next_pos = _prefill(model, params, input_ids, mask, max_len=max_len,
                                       cache_dtype=parse_dtype(cache_dtype))
    rng = jax.random.key(0) if rng is None else rng
    return _decode(model, params, logits, cache, next_pos, rng, max_new_tokens=max_new_tokens,
                   sampling=sampling, eos_id=eos_id, pad_id=pad_id, return_logits=return_logits)
