"""OmniLM: the omni model (LLM + media towers) as a TrainModel, mirroring train.model.DecoderLM.

Batch: the pipeline's per-token arrays (input_ids, targets, loss_mask, optional segment_ids,
positions, modality) plus optional media arrays image [n, H, W, 3], video [n, F, H, W, 3],
audio [n, mels, frames] (see omni_jax.model). `init` always builds every configured tower (it
feeds one zero item per modality), so a text-only first batch still creates all parameters
and stage patterns such as "^audio_adapter/" match.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from omni_jax.model import AUDIO_WAVE, OmniModel, media_shapes
from omni_jax.omni_config import MODALITIES, OmniConfig
from omni_jax.train.model import Batch

MODEL_KEYS = ("input_ids", "modality", "media_index", "segment_ids", "positions", *MODALITIES,
              AUDIO_WAVE)


def dummy_media(config: OmniConfig) -> dict[str, jax.Array]:
    """One zero item per media key of the model (model.media_shapes), at its static shape."""
    return {k: jnp.zeros((1, *shape), jnp.float32) for k, shape in media_shapes(config).items()}


class OmniLM:
    """OmniModel as a TrainModel: apply -> {"logits", "hidden"} (+ "highway" when configured).

    fused_head_chunk: if set, `apply` returns {"hidden", "lm_head"} instead of logits, so the
    "ce" loss computes the LM head in chunks (no full [batch, seq, vocab]), as DecoderLM.
    """

    def __init__(self, config: OmniConfig, fused_head_chunk: int | None = None) -> None:
        if fused_head_chunk is not None and fused_head_chunk <= 0:
            raise ValueError(f"OmniLM: fused_head_chunk must be positive, got {fused_head_chunk}")
        self.config = config
        self.module = OmniModel(config)
        self.fused_head_chunk = fused_head_chunk

    @staticmethod
    def _inputs(batch: Batch) -> dict[str, Any]:
        return {k: batch[k] for k in MODEL_KEYS if batch.get(k) is not None}

    def init(self, rng: jax.Array, batch: Batch) -> Any:
        inputs = self._inputs(batch)
        # every tower runs once on a zero item; no placeholder selects it (modality all text)
        inputs.update(dummy_media(self.config))
        inputs["modality"] = jnp.zeros_like(inputs["input_ids"])
        return self.module.init(rng, inputs)

    def apply(self, params: Any, batch: Batch, *, train: bool = True) -> dict[str, Any]:
        del train  # no dropout in the towers or the decoder
        fused = self.fused_head_chunk is not None
        out = self.module.apply({"params": params}, self._inputs(batch),
                                compute_logits=not fused)
        result = {k: v for k, v in out.items() if k not in ("cache", "logits", "hidden")}
        if not fused:
            return {**result, "logits": out["logits"], "hidden": None}
        llm = params["llm"]
        if self.config.llm.tie_word_embeddings:
            kernel = jnp.transpose(llm["embed"]["embedding"])  # [embed, vocab]
        else:
            kernel = llm["lm_head"]["kernel"]
        return {**result, "hidden": out["hidden"], "lm_head": kernel}

    def flops_per_token(self, seq_len: int) -> float:
        """The LLM's forward FLOPs per token (media towers not counted: MFU is a lower bound)."""
        return self.config.llm.flops_per_token(seq_len)
