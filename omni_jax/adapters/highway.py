"""X-VILA's visual embedding highway (VEH): encoder features that bypass the LLM.

The vision encoder's patch features are projected (Linear, or a 2-layer MLP) to the visual
decoder's conditioning width and returned next to the LLM's hidden states, so a downstream
image/video decoder sees visual detail the LLM's text-shaped output would lose. The highway never
reads LLM activations: its output depends on the vision features and its own weights only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import flax.struct
import jax

from omni_jax.adapters.mlp_projector import (
    ACT,
    AdapterConfig,
    check_patch_features,
    check_positive,
)
from omni_jax.layers.common import constrain, logical_init, parse_dtype
from omni_jax.layers.mlp import GeluMLP, activation


@dataclasses.dataclass(frozen=True)
class HighwayConfig(AdapterConfig):
    """out_dim: visual decoder width; hidden_dim None -> one Linear, else Linear-act-Linear."""

    out_dim: int = 64
    hidden_dim: int | None = None
    act: str = "gelu"
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_positive("HighwayConfig", out_dim=self.out_dim, init_std=self.init_std)
        if self.hidden_dim is not None:
            check_positive("HighwayConfig", hidden_dim=self.hidden_dim)
        activation(self.act)
        parse_dtype(self.dtype)
        parse_dtype(self.param_dtype)


@flax.struct.dataclass
class HighwayOutput:
    """What an any-to-any model hands its decoders: the LLM side and the highway side."""

    llm_hidden: jax.Array  # [batch, seq, D] final-normed LLM hidden states
    highway: jax.Array  # [batch, num_visual_tokens, out_dim] visual features past the LLM
    logits: jax.Array | None = None  # [batch, seq, vocab] text logits, when computed


class VisualHighway(nn.Module):
    """Patch features [batch, gh*gw, C] -> decoder conditioning [batch, gh*gw, out_dim]."""

    config: HighwayConfig

    def num_tokens(self, grid_h: int, grid_w: int) -> int:
        return grid_h * grid_w

    @nn.compact
    def __call__(self, x: jax.Array, grid_hw: Sequence[int]) -> jax.Array:
        c = self.config
        check_patch_features(x, grid_hw, "VisualHighway")
        dt, pdt = parse_dtype(c.dtype), parse_dtype(c.param_dtype)
        x = constrain(x.astype(dt), ACT)
        if c.hidden_dim is None:
            y = nn.Dense(c.out_dim, dtype=dt, param_dtype=pdt,
                         kernel_init=logical_init(nn.initializers.normal(c.init_std),
                                                  ("embed", "mlp")),
                         bias_init=logical_init(nn.initializers.zeros, ("mlp",)),
                         name="proj")(x)
        else:
            y = GeluMLP(c.hidden_dim, c.act, c.init_std, dt, pdt, out_features=c.out_dim,
                        name="mlp")(x)
        return constrain(y, ACT)


def with_highway(llm_out: dict, highway: jax.Array) -> HighwayOutput:
    """Pack a Decoder output dict ({"hidden", "logits", ...}) with the highway features."""
    if highway.ndim != 3 or highway.shape[0] != llm_out["hidden"].shape[0]:
        raise ValueError(f"with_highway: highway must be [batch={llm_out['hidden'].shape[0]}, "
                         f"tokens, width], got {tuple(highway.shape)}")
    return HighwayOutput(llm_hidden=llm_out["hidden"], highway=highway,
                         logits=llm_out.get("logits"))
