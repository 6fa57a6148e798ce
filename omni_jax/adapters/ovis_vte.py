"""Ovis visual tokenizer head + visual embedding table (VTE), as transformers' ovis2.

Patch features [batch, gh*gw, C] (the ViT's last, normed hidden states) -> hidden_stride
pixel-shuffle (zero-pad bottom/right to a multiple of the stride; channels ordered (dy, dx, c))
-> Linear(no bias, -> V - k) -> LayerNorm -> softmax | gumbel_argmax | st_argmax -> zero
columns for the k indicator ids -> probabilities p [batch, n, V] -> VTE: p @ W [batch, n, D].
Integer ids look rows up; the k indicator tokens are the last k ids (one-hot rows of the table).
Ovis2 (transformers): k = 5; Ovis 1: k = 2, hidden_stride 1. Grids not divisible by the stride
are padded as in AIDC-AI's Ovis code (reshape to the grid, then pad); transformers 5's ovis2 pads
the flat [n, seq, C] tensor instead and fails on such grids, so parity is checked on divisible ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.adapters.mlp_projector import (
    ACT,
    AdapterConfig,
    check_choice,
    check_patch_features,
    check_positive,
)
from omni_jax.layers.common import constrain, logical_init, parse_dtype
from omni_jax.layers.norms import LayerNorm

TOKENIZE_FUNCTIONS = ("softmax", "gumbel_argmax", "st_argmax")


@dataclasses.dataclass(frozen=True)
class OvisVTEConfig(AdapterConfig):
    """Visual vocabulary, head and VTE settings (names follow transformers' Ovis2VisionConfig)."""

    out_dim: int = 64  # D, the LLM width
    vocab_size: int = 64  # V, indicator ids included
    num_visual_indicator_tokens: int = 5
    hidden_stride: int = 1
    tokenize_function: str = "softmax"
    gumbel_tau: float = 1.0  # default temperature; anneal by passing tau= at call time
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02  # head
    vte_mean: float = 0.0  # VTE init N(vte_mean, vte_std); see llm_embedding_stats
    vte_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_positive("OvisVTEConfig", out_dim=self.out_dim, vocab_size=self.vocab_size,
                       hidden_stride=self.hidden_stride, gumbel_tau=self.gumbel_tau,
                       layer_norm_eps=self.layer_norm_eps, init_std=self.init_std,
                       vte_std=self.vte_std)
        if not 0 <= self.num_visual_indicator_tokens < self.vocab_size:
            raise ValueError(f"OvisVTEConfig: num_visual_indicator_tokens must be in "
                             f"[0, vocab_size={self.vocab_size}), got "
                             f"{self.num_visual_indicator_tokens}")
        check_choice("OvisVTEConfig", "tokenize_function", self.tokenize_function,
                     TOKENIZE_FUNCTIONS)
        parse_dtype(self.dtype)
        parse_dtype(self.param_dtype)

    @property
    def head_size(self) -> int:
        """Number of ids the head predicts (V minus the indicator ids)."""
        return self.vocab_size - self.num_visual_indicator_tokens

    def merged_hw(self, grid_h: int, grid_w: int) -> tuple[int, int]:
        s = self.hidden_stride
        return math.ceil(grid_h / s), math.ceil(grid_w / s)


def llm_embedding_stats(embedding: jax.Array | np.ndarray) -> dict[str, float]:
    """{"vte_mean", "vte_std"} of an LLM token-embedding table (Ovis' vte_re_init: scalar mean
    and torch's unbiased std over all entries); merge into the config dict."""
    e = np.asarray(embedding, np.float64)
    return {"vte_mean": float(e.mean()), "vte_std": float(e.std(ddof=1))}


def hidden_stride_merge(x: jax.Array, grid_hw: Sequence[int], stride: int) -> jax.Array:
    """[batch, gh*gw, C] -> [batch, ceil(gh/s)*ceil(gw/s), s*s*C]; zero pad bottom/right first."""
    if stride == 1:
        return x
    (gh, gw), b, ch = grid_hw, x.shape[0], x.shape[-1]
    h, w = math.ceil(gh / stride), math.ceil(gw / stride)
    g = jnp.pad(x.reshape(b, gh, gw, ch),
                ((0, 0), (0, h * stride - gh), (0, w * stride - gw), (0, 0)))
    g = g.reshape(b, h, stride, w, stride, ch).transpose(0, 1, 3, 2, 4, 5)
    return g.reshape(b, h * w, stride * stride * ch)


def straight_through(soft: jax.Array) -> jax.Array:
    """One-hot of argmax(soft) in the forward pass, gradient of `soft` in the backward pass."""
    hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), soft.shape[-1], dtype=soft.dtype)
    return hard - jax.lax.stop_gradient(soft) + soft


class VisualEmbeddingTable(nn.Module):
    """Embedding(V, D): float probabilities p -> p @ W; integer ids -> row lookup."""

    num_embeddings: int
    features: int
    mean: float = 0.0
    std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        init = lambda key, shape, dt: (  # noqa: E731
            self.mean + self.std * jax.random.normal(key, shape, dt))
        table = self.param("embedding", logical_init(init, ("vocab", "embed")),
                           (self.num_embeddings, self.features), self.param_dtype)
        table = table.astype(self.dtype)
        if jnp.issubdtype(tokens.dtype, jnp.integer):
            return jnp.take(table, tokens, axis=0)
        if tokens.shape[-1] != self.num_embeddings:
            raise ValueError(f"VisualEmbeddingTable: probabilities must have "
                             f"{self.num_embeddings} columns, got shape {tuple(tokens.shape)}")
        return jnp.einsum("...v,vd->...d", tokens.astype(self.dtype), table)


class OvisVisualTokenizer(nn.Module):
    """Patch features [batch, gh*gw, C] -> visual-word probabilities and VTE embeddings [.., D].

    gumbel_argmax draws noise from the "gumbel" rng stream (rngs={"gumbel": key}).
    """

    config: OvisVTEConfig

    def setup(self) -> None:
        c = self.config
        dt, pdt = parse_dtype(c.dtype), parse_dtype(c.param_dtype)
        self.head_linear = nn.Dense(
            c.head_size, use_bias=False, dtype=dt, param_dtype=pdt,
            kernel_init=logical_init(nn.initializers.normal(c.init_std), ("embed", "vocab")))
        self.head_norm = LayerNorm(c.layer_norm_eps, dtype=jnp.float32, param_dtype=pdt)
        self.vte = VisualEmbeddingTable(c.vocab_size, c.out_dim, c.vte_mean, c.vte_std, dt, pdt)

    def num_tokens(self, grid_h: int, grid_w: int) -> int:
        h, w = self.config.merged_hw(grid_h, grid_w)
        return h * w

    def logits(self, x: jax.Array, grid_hw: Sequence[int]) -> jax.Array:
        """Head output after LayerNorm, float32 [batch, n, V - k]."""
        grid_hw = check_patch_features(x, grid_hw, "OvisVisualTokenizer")
        x = hidden_stride_merge(x, grid_hw, self.config.hidden_stride)  # [batch, n, s*s*C]
        return self.head_norm(self.head_linear(x.astype(parse_dtype(self.config.dtype))))

    def probabilities(self, x: jax.Array, grid_hw: Sequence[int],
                      tau: float | jax.Array | None = None) -> jax.Array:
        """[batch, n, V] float32; the last k (indicator) columns are zero."""
        c = self.config
        logits = self.logits(x, grid_hw)
        if c.tokenize_function == "softmax":
            p = jax.nn.softmax(logits, axis=-1)
        elif c.tokenize_function == "st_argmax":
            p = straight_through(jax.nn.softmax(logits, axis=-1))
        else:  # gumbel_argmax: hard one-hot forward, softmax((logits + g) / tau) gradient
            tau = c.gumbel_tau if tau is None else tau
            g = jax.random.gumbel(self.make_rng("gumbel"), logits.shape, logits.dtype)
            p = straight_through(jax.nn.softmax((logits + g) / tau, axis=-1))
        pad = [(0, 0)] * (p.ndim - 1) + [(0, c.num_visual_indicator_tokens)]
        return jnp.pad(p, pad)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """VTE: probabilities [..., V] -> [..., D]; integer ids [...] -> [..., D]."""
        return self.vte(tokens)

    def indicator_embeddings(self) -> jax.Array:
        """[k, D]: the VTE rows of the last k ids (begin/end/... markers placed by the template)."""
        c = self.config
        return self.vte(jnp.arange(c.head_size, c.vocab_size, dtype=jnp.int32))

    def __call__(self, x: jax.Array, grid_hw: Sequence[int],
                 tau: float | jax.Array | None = None) -> jax.Array:
        """[batch, gh*gw, C] -> [batch, num_tokens(gh, gw), D]."""
        p = self.probabilities(x, grid_hw, tau)
        return constrain(self.embed(p), ACT)
