"""The speech generator as a training head: its outputs for the speech losses, and the frozen
DPO reference. `SpeechHead` is used by train.omni_model.OmniLM (on the LLM's hidden states);
`SpeechLM` is a TrainModel of the generator alone, on precomputed LLM hidden states.

Params: {"speech": generator} (+ "speech_ref": the reference, with dpo_reference). Batch (see
data.speech): speech_rows [B, R], speech_text_ids / speech_text_mask [B, S], speech_units /
speech_unit_mask [B, U] (+ speech_units_rejected / speech_unit_mask_rejected for DPO), and for
SpeechLM the states speech_hidden [B, R, H].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

Batch = Mapping[str, jax.Array]


def speech_loglik(config: Any, out: Mapping[str, jax.Array], units: jax.Array,
                  unit_mask: jax.Array) -> jax.Array:
    """Per-item length-normalised log-likelihood l(y) of units under generator outputs: [B]."""
    if config.mode == "ctc":
        from omni_jax.train.speech_losses import ctc_loglik

        return ctc_loglik(out["speech_log_probs"], out["speech_frame_mask"], units, unit_mask)
    logp = jax.nn.log_softmax(out["speech_ar_logits"].astype(jnp.float32), axis=-1)
    tok = jnp.take_along_axis(logp, out["speech_ar_targets"][..., None], axis=-1)[..., 0]
    mask = out["speech_ar_mask"].astype(jnp.float32)
    return jnp.sum(tok * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def speech_feasible(config: Any, out: Mapping[str, jax.Array], units: jax.Array,
                    unit_mask: jax.Array) -> jax.Array:
    """[B] bool: whether speech_loglik is defined (CTC: the frames hold the units and their
    repeats' blanks; it is 0 otherwise, as zero_infinity; AR: always)."""
    if config.mode == "ctc":
        from omni_jax.train.speech_losses import ctc_feasible

        return ctc_feasible(out["speech_frame_mask"], units, unit_mask)
    return jnp.ones(units.shape[:1], bool)


class SpeechHead:
    """Generator params, init, DPO reference handling and outputs for the speech losses."""

    def __init__(self, config: Any, dpo_reference: bool = False) -> None:
        from omni_jax.speech.generator import SpeechGenerator

        self.config, self.dpo_reference = config, dpo_reference
        self.module = SpeechGenerator(config)

    def init(self, rng: jax.Array) -> dict[str, Any]:
        """{"speech": boxed params} (+ "speech_ref", the same initial values)."""
        h = self.config.llm_hidden
        dummy = (jnp.zeros((1, 4, h), jnp.float32), jnp.ones((1, 4), bool),
                 jnp.ones((1, 2), jnp.int32), jnp.ones((1, 2), bool),
                 jnp.ones((1, 3), jnp.int32), jnp.ones((1, 3), bool))
        speech = self.module.init(rng, *dummy)["params"]
        return {"speech": speech, **({"speech_ref": speech} if self.dpo_reference else {})}

    def prepare_params(self, params: Any) -> Any:
        """Params of the previous stage -> this head's tree: with a DPO reference the generator
        is copied into "speech_ref" (frozen at DPO start) unless already there; without, a
        leftover reference is dropped."""
        if self.dpo_reference and "speech_ref" not in params:
            if "speech" not in params:
                raise ValueError("DPO stage: the previous stage's params have no 'speech' "
                                 "generator to copy as the reference")
            return {**params, "speech_ref": jax.tree.map(jnp.copy, params["speech"])}
        if not self.dpo_reference and "speech_ref" in params:
            return {k: v for k, v in params.items() if k != "speech_ref"}
        return params

    def generate(self, params: Any, hidden: jax.Array, batch: Batch,
                 rejected: bool = False) -> dict[str, jax.Array]:
        """Generator outputs for the chosen (or rejected) units of the batch."""
        sfx = "_rejected" if rejected else ""
        return self.module.apply(
            {"params": params}, hidden, batch["speech_rows"].astype(bool),
            batch["speech_text_ids"], batch["speech_text_mask"].astype(bool),
            batch["speech_units" + sfx], batch["speech_unit_mask" + sfx].astype(bool))

    def outputs(self, params: Any, hidden: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        """hidden [B, R, H] (detached here) -> speech outputs (+ dpo_* log-likelihoods)."""
        hidden = jax.lax.stop_gradient(hidden.astype(jnp.float32))
        out = dict(self.generate(params["speech"], hidden, batch))
        if not self.dpo_reference or batch.get("speech_units_rejected") is None:
            return out
        ref = jax.lax.stop_gradient(params["speech_ref"])
        real = jnp.any(batch["speech_unit_mask"] > 0, axis=-1)  # not a padding row
        for who, p in (("policy", params["speech"]), ("ref", ref)):
            for side in ("chosen", "rejected"):
                rej = side == "rejected"
                o = out if (who, side) == ("policy", "chosen") else self.generate(
                    p, hidden, batch, rejected=rej)
                sfx = "_rejected" if rej else ""
                units, mask = batch["speech_units" + sfx], batch["speech_unit_mask" + sfx]
                out[f"dpo_{who}_{side}"] = speech_loglik(self.config, o, units, mask)
                if who == "policy":  # l(y) = 0 for a side its frames cannot hold: no pair
                    real = real & speech_feasible(self.config, o, units, mask)
        out["dpo_mask"] = real
        return out


class SpeechLM:
    """TrainModel of the generator alone: batch["speech_hidden"] [B, R, H] holds the LLM states
    (e.g. precomputed from a frozen LLM), plus the speech targets of data.speech."""

    def __init__(self, config: Any, *, dpo_reference: bool = False) -> None:
        self.config = config
        self.head = SpeechHead(config, dpo_reference)
        self.dpo_reference = dpo_reference

    def init(self, rng: jax.Array, batch: Batch) -> Any:
        del batch  # the generator's params do not depend on the batch shapes
        return {"params": self.head.init(rng)}

    def prepare_params(self, params: Any) -> Any:
        return self.head.prepare_params(params)

    def apply(self, params: Any, batch: Batch, *, train: bool = True) -> dict[str, Any]:
        del train
        return self.head.outputs(params, batch["speech_hidden"], batch)

    def flops_per_token(self, seq_len: int) -> float:
        """The generator decoder's forward FLOPs per frame (a lower bound of the step)."""
        return self.config.decoder.flops_per_token(seq_len)
