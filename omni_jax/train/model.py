"""The model interface the trainer needs, and its implementation for the bare LLM.

Any model (the omni model later) plugs in by providing `init`, `apply` and `flops_per_token`;
`apply` returns a dict of outputs that the stage's losses read (e.g. "logits").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from omni_jax.llm.config import LLMConfig
from omni_jax.llm.decoder import Decoder

Batch = Mapping[str, jax.Array]


class TrainModel(Protocol):
    """What the trainer calls. Params are plain pytrees; `init` returns boxed (logical) ones."""

    def init(self, rng: jax.Array, batch: Batch) -> Any:
        """-> variables {"params": tree of nn.LogicallyPartitioned} (run under eval_shape/jit)."""

    def apply(self, params: Any, batch: Batch, *, train: bool = True) -> dict[str, Any]:
        """-> outputs read by the losses."""

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (training counts 3x)."""


class DecoderLM:
    """The bare causal LM as a TrainModel: batch {"input_ids","positions","segment_ids",...}.

    fused_head_chunk: if set, `apply` returns {"hidden", "lm_head"} instead of logits, so the
    "ce" loss computes the LM head in seq chunks of this size (no full [batch, seq, vocab]).
    """

    def __init__(self, config: LLMConfig, fused_head_chunk: int | None = None) -> None:
        if fused_head_chunk is not None and fused_head_chunk <= 0:
            raise ValueError(f"DecoderLM: fused_head_chunk must be positive, got "
                             f"{fused_head_chunk}")
        self.config = config
        self.module = Decoder(config)
        self.fused_head_chunk = fused_head_chunk

    def _kwargs(self, batch: Batch) -> dict[str, Any]:
        return {"positions": batch.get("positions"), "segment_ids": batch.get("segment_ids")}

    def init(self, rng: jax.Array, batch: Batch) -> Any:
        return self.module.init(rng, batch["input_ids"], **self._kwargs(batch))

    def apply(self, params: Any, batch: Batch, *, train: bool = True) -> dict[str, Any]:
        del train  # no dropout in the decoder
        fused = self.fused_head_chunk is not None
        out = self.module.apply({"params": params}, batch["input_ids"], **self._kwargs(batch),
                                compute_logits=not fused)
        if not fused:
            return {"logits": out["logits"], "hidden": None}
        if self.config.tie_word_embeddings:
            kernel = jnp.transpose(params["embed"]["embedding"])  # [embed, vocab]
        else:
            kernel = params["lm_head"]["kernel"]
        return {"hidden": out["hidden"], "lm_head": kernel}

    def flops_per_token(self, seq_len: int) -> float:
        return self.config.flops_per_token(seq_len)
