"""Qwen2/2.5-style causal decoder: token embedding, pre-norm GQA + SwiGLU blocks, LM head."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from omni_jax.layers.attention import Attention, cache_mask, causal_segment_mask
from omni_jax.layers.common import constrain, logical_init, parse_dtype
from omni_jax.layers.mlp import SwiGLU
from omni_jax.layers.norms import RMSNorm
from omni_jax.llm.config import LLMConfig

_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}
_ACT = ("act_batch", "act_len", "act_embed")


class Block(nn.Module):
    """x + attn(norm(x)); x + mlp(norm(x))."""

    config: LLMConfig

    @nn.compact
    def __call__(self, x, mask, positions, kv, index):  # x [batch, seq, embed]
        c = self.config
        dt, pdt = parse_dtype(c.dtype), parse_dtype(c.param_dtype)
        h = RMSNorm(c.rms_norm_eps, dt, pdt, name="input_norm")(x)
        h, kv = Attention(c.num_heads, c.num_kv_heads, c.head_dim, q_bias=c.qkv_bias,
                          k_bias=c.qkv_bias, v_bias=c.qkv_bias, o_bias=False,
                          rope_theta=c.rope_theta, init_std=c.initializer_range, dtype=dt,
                          param_dtype=pdt, name="attn")(h, mask, positions, kv, index)
        x = constrain(x + checkpoint_name(h, "attn_out"), _ACT)
        h = RMSNorm(c.rms_norm_eps, dt, pdt, name="post_attn_norm")(x)
        h = SwiGLU(c.intermediate_size, c.initializer_range, dt, pdt, name="mlp")(h)
        return constrain(x + h, _ACT), kv


def _block_cls(config: LLMConfig) -> type[nn.Module]:
    if config.remat_policy == "none":
        return Block
    return nn.remat(Block, policy=_REMAT[config.remat_policy], prevent_cse=not config.scan_layers)


class Decoder(nn.Module):
    """Causal LM. Call with token ids or embeddings; returns logits, final hidden, new cache."""

    config: LLMConfig

    def setup(self) -> None:
        c = self.config
        dt, pdt = parse_dtype(c.dtype), parse_dtype(c.param_dtype)
        self.embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=dt, param_dtype=pdt,
                              embedding_init=logical_init(
                                  nn.initializers.normal(c.initializer_range), ("vocab", "embed")))
        block = _block_cls(c)
        if c.scan_layers:
            self.layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})(c, name="layers")
        else:
            self.layers = [block(c, name=f"layers_{i}") for i in range(c.num_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, dt, pdt, name="norm")
        if not c.tie_word_embeddings:
            self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=dt, param_dtype=pdt,
                                    kernel_init=logical_init(
                                        nn.initializers.normal(c.initializer_range),
                                        ("embed", "vocab")), name="lm_head")

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """[batch, seq] int -> [batch, seq, embed]."""
        return constrain(self.embed(input_ids), _ACT)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden [batch, seq, embed] -> float32 logits [batch, seq, vocab]."""
        if self.config.tie_word_embeddings:
            out = self.embed.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return constrain(out.astype(jnp.float32), ("act_batch", "act_len", "act_vocab"))

    def __call__(self, input_ids: jax.Array | None = None, *,
                 inputs_embeds: jax.Array | None = None, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, cache: dict[str, Any] | None = None,
                 compute_logits: bool = True) -> dict[str, Any]:
        """input_ids [batch, seq] or inputs_embeds [batch, seq, embed].

        segment_ids [batch, seq]: 0 marks padding; equal non-zero ids attend to each other
        (packing).
        positions default to 0..seq-1 (offset by the cache index when decoding with a cache).
        cache: from `omni_jax.layers.attention.init_cache`; written at cache["index"].
        """
        x = self._inputs(input_ids, inputs_embeds)
        b, s = x.shape[:2]
        if segment_ids is None:
            segment_ids = jnp.ones((b, s), jnp.int32)
        if cache is None:
            index = None
            mask = causal_segment_mask(segment_ids)
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        else:
            index = cache["index"]
            valid = jax.lax.dynamic_update_slice(cache["valid"], segment_ids != 0, (0, index))
            mask = cache_mask(valid, index, s)
            if positions is None:
                positions = jnp.broadcast_to(index + jnp.arange(s, dtype=jnp.int32), (b, s))
        x = constrain(x, _ACT)
        kv = None if cache is None else {"k": cache["k"], "v": cache["v"]}
        if self.config.scan_layers:
            x, kv = self.layers(x, mask, positions, kv, index)
        else:
            new = []
            for i, layer in enumerate(self.layers):
                layer_kv = None if kv is None else {"k": kv["k"][i], "v": kv["v"][i]}
                x, layer_kv = layer(x, mask, positions, layer_kv, index)
                new.append(layer_kv)
            if kv is not None:
                kv = {n: jnp.stack([c[n] for c in new]) for n in ("k", "v")}
        hidden = self.norm(x)
        out = {"hidden": hidden, "cache": None}
        if cache is not None:
            out["cache"] = {**kv, "valid": valid, "index": index + s}
        out["logits"] = self.logits(hidden) if compute_logits else None
        return out

    def _inputs(self, input_ids, inputs_embeds) -> jax.Array:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Decoder: pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
                raise ValueError(f"Decoder: input_ids must be an integer array [batch, seq], got "
                                 f"shape {input_ids.shape} dtype {input_ids.dtype}")
            return self.embed_tokens(input_ids)
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"Decoder: inputs_embeds must be [batch, seq, "
                             f"{self.config.hidden_size}], got {inputs_embeds.shape}")
        return inputs_embeds.astype(parse_dtype(self.config.dtype))
