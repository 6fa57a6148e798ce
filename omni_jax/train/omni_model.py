"""OmniLM: the omni model (LLM + media towers + speech generator) as a TrainModel, mirroring
train.model.DecoderLM.

Batch: the pipeline's per-token arrays (input_ids, targets, loss_mask, optional segment_ids,
positions, modality) plus optional media arrays image [n, H, W, 3], video [n, F, H, W, 3],
audio [n, mels, frames] (see omni_jax.model). `init` always builds every configured tower (it
feeds one zero item per modality), so a text-only first batch still creates all parameters
and stage patterns such as "^audio_adapter/" match.

Speech out (config.speech, OpenOmni): the generator's params live under "speech". A batch with
speech targets (data.speech: speech_rows, speech_text_ids/_mask, speech_units/_mask) runs it
on the LLM's last hidden states, detached (the generator reads the frozen LLM's states, as
OpenOmni trains it), adding its outputs (speech_log_probs ... or speech_ar_*) for the `ctc` /
`unit_ce` losses. With `dpo_reference=True` the params also hold "speech_ref", a frozen copy of
the generator taken at DPO start (`prepare_params`), and a batch with speech_units_rejected
adds the per-pair length-normalised log-likelihoods dpo_{policy,ref}_{chosen,rejected} for
the `dpo` loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from omni_jax.model import MEDIA_KEYS, OmniModel, media_shapes
from omni_jax.omni_config import OmniConfig
from omni_jax.train.model import Batch

MODEL_KEYS = ("input_ids", "modality", "media_index", "segment_ids", "positions", *MEDIA_KEYS)
SPEECH_PARAMS = ("speech", "speech_ref")


def dummy_media(config: OmniConfig) -> dict[str, jax.Array]:
    """One zero item per media key of the model (model.media_shapes), at its static shape."""
    return {k: jnp.zeros((1, *shape), jnp.float32) for k, shape in media_shapes(config).items()}


class OmniLM:
    """OmniModel (+ speech generator) as a TrainModel: apply -> {"logits", "hidden",
    "inputs_embeds", "lm_head"} (+ "highway", speech outputs when configured and the batch has
    speech targets); lm_head [embed, vocab] (the tied embeddings or the head's kernel).

    fused_head_chunk: if set, `apply` returns "hidden" instead of logits, so the "ce" loss
    computes the LM head in chunks (no full [batch, seq, vocab]), as DecoderLM.
    dpo_reference: keep a frozen reference generator ("speech_ref") for the `dpo` loss.
    """

    def __init__(self, config: OmniConfig, fused_head_chunk: int | None = None, *,
                 dpo_reference: bool = False) -> None:
        if fused_head_chunk is not None and fused_head_chunk <= 0:
            raise ValueError(f"OmniLM: fused_head_chunk must be positive, got {fused_head_chunk}")
        if dpo_reference and config.speech is None:
            raise ValueError("OmniLM: a DPO reference needs a speech generator (model.speech)")
        self.config = config
        self.module = OmniModel(config)
        self.fused_head_chunk = fused_head_chunk
        self.dpo_reference = dpo_reference
        self.speech = None
        if config.speech is not None:
            from omni_jax.train.speech_model import SpeechHead

            self.speech = SpeechHead(config.speech, dpo_reference)

    @staticmethod
    def _inputs(batch: Batch) -> dict[str, Any]:
        return {k: batch[k] for k in MODEL_KEYS if batch.get(k) is not None}

    def init(self, rng: jax.Array, batch: Batch) -> Any:
        inputs = self._inputs(batch)
        # every tower runs once on a zero item; no placeholder selects it (modality all text)
        inputs.update(dummy_media(self.config))
        inputs["modality"] = jnp.zeros_like(inputs["input_ids"])
        variables = self.module.init(rng, inputs)
        if self.speech is None:
            return variables
        return {**variables, "params": {**variables["params"],
                                        **self.speech.init(jax.random.fold_in(rng, 1))}}

    def prepare_params(self, params: Any) -> Any:
        """Params of the previous stage -> this model's tree (see SpeechHead.prepare_params)."""
        return params if self.speech is None else self.speech.prepare_params(params)

    def apply(self, params: Any, batch: Batch, *, train: bool = True) -> dict[str, Any]:
        del train  # no dropout in the towers, the decoder or the generator
        fused = self.fused_head_chunk is not None
        lm_params = {k: v for k, v in params.items() if k not in SPEECH_PARAMS}
        out = self.module.apply({"params": lm_params}, self._inputs(batch),
                                compute_logits=not fused)
        result = {k: v for k, v in out.items() if k not in ("cache", "logits", "hidden")}
        if self.speech is not None and batch.get("speech_text_ids") is not None:
            result.update(self.speech.outputs(params, out["hidden"], batch))
        llm = params["llm"]
        if self.config.llm.tie_word_embeddings:
            kernel = jnp.transpose(llm["embed"]["embedding"])  # [embed, vocab]
        else:
            kernel = llm["lm_head"]["kernel"]
        if not fused:  # lm_head: for losses on other states (audio_ctc); "ce" uses logits
            return {**result, "logits": out["logits"], "hidden": None, "lm_head": kernel}
        return {**result, "hidden": out["hidden"], "lm_head": kernel}

    def flops_per_token(self, seq_len: int) -> float:
        """The LLM's forward FLOPs per token (towers and generator not counted: MFU is a lower
        bound)."""
        return self.config.llm.flops_per_token(seq_len)


def stage_model(config: OmniConfig, losses: Mapping[str, Any],
                fused_head_chunk: int | None = None) -> OmniLM:
    """The TrainModel of one stage: a DPO stage (a `dpo` loss) keeps a reference generator."""
    return OmniLM(config, fused_head_chunk, dpo_reference="dpo" in dict(losses))
