"""Caption-word classification of an image's tokens: pretraining an image tower from scratch
by its captions' words (Joulin et al., 2016; SuperClass, Huang et al., 2024: a vision
encoder for VLMs trained to classify the caption's tokens matches CLIP's contrastive one).

The image-side counterpart of `audio_ctc`: a row's image tokens (the projector's outputs, in
the LLM's embedding space) are mean-pooled and classified by their cosine to the LLM's own
output head (tied: the token embeddings), `scale` x cosine as logits over the vocabulary; the
loss is the cross-entropy of that distribution against the row's caption tokens as a bag of
words (each marked token counts once per occurrence: term frequencies), averaged over the
rows that have both. It adds no parameters and turns image tokens towards the embeddings of
the words that describe them, which the LLM then reads; cosine, so their norm stays free (as
audio_ctc). A stage with only this loss costs no LLM pass (its outputs are unused and XLA
drops them). Cost: fp32 [rows, vocab] logits (qwen7b: 0.6 MB per row).

Batch: `transcript_mask` [batch, seq] (data.omni.OmniEncoder with the recipe's
`transcript_tasks`, e.g. ("image_caption",)) marks the caption tokens of input_ids; image tokens
are the positions with modality == image (every image of a row pools together: one captioned
image per record is the intended use; a tiling tower's views pool as one image). One
conversation per row (packing off, checked at plan time).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from omni_jax.data.packing import MEDIA_CODES
from omni_jax.train.audio_ctc import SCALE, TRANSCRIPT_KEY, check_transcripts
from omni_jax.train.losses import register_loss
from omni_jax.train.speech_losses import _require, _with_check

IMAGE_CODE = MEDIA_CODES["image"]  # data.template's modality id of image placeholders


def _check(*, scale: float = SCALE, head_grad: bool = False) -> None:
    ok = isinstance(scale, int | float) and not isinstance(scale, bool) and math.isfinite(scale)
    if not ok or not scale > 0:
        raise ValueError(f"loss 'image_bow': scale must be a finite number > 0, got {scale!r}")
    if not isinstance(head_grad, bool):
        raise ValueError(f"loss 'image_bow': head_grad must be a bool, got {head_grad!r}")


def pooled_image(embeds: jax.Array, modality: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean of each row's image tokens -> (pooled [B, D] fp32, image-token count [B])."""
    image = (modality == IMAGE_CODE).astype(jnp.float32)  # [B, S]
    n = jnp.sum(image, axis=-1)
    total = jnp.einsum("bs,bsd->bd", image, embeds.astype(jnp.float32))
    return total / jnp.maximum(n, 1.0)[:, None], n


def image_bow_log_probs(pooled: jax.Array, kernel: jax.Array, scale: float = SCALE
                        ) -> jax.Array:
    """Pooled image tokens [B, D], output head [D, V] -> log-probs [B, V] (fp32) of
    scale * cosine(pooled, head column)."""
    x = pooled * jax.lax.rsqrt(jnp.sum(pooled * pooled, axis=-1, keepdims=True) + 1e-12)
    dots = jnp.einsum("bd,dv->bv", x.astype(kernel.dtype), kernel,
                      preferred_element_type=jnp.float32)
    inv = jax.lax.rsqrt(jnp.sum(jnp.square(kernel.astype(jnp.float32)), axis=0) + 1e-12)
    return jax.nn.log_softmax(scale * dots * inv, axis=-1)


@register_loss("image_bow")
@_with_check(_check)
def image_bow_loss(outputs: Mapping[str, Any], batch: Mapping[str, jax.Array], *,
                   scale: float = SCALE, head_grad: bool = False
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean over captioned image rows of -mean(log p(caption token | pooled image)). head_grad:
    also train the output head on this loss; off, the embeddings are fixed targets."""
    _check(scale=scale, head_grad=head_grad)
    _require("image_bow", "outputs", outputs, ("inputs_embeds", "lm_head"))
    _require("image_bow", "batch", batch, ("input_ids", "modality", TRANSCRIPT_KEY))
    words = (batch[TRANSCRIPT_KEY] > 0).astype(jnp.float32)  # [B, S]
    n_words = jnp.sum(words, axis=-1)
    pooled, n_image = pooled_image(outputs["inputs_embeds"], batch["modality"])
    head = outputs["lm_head"] if head_grad else jax.lax.stop_gradient(outputs["lm_head"])
    log_probs = image_bow_log_probs(pooled, head, scale)  # [B, V]
    token_lp = jnp.take_along_axis(log_probs, batch["input_ids"], axis=-1)  # [B, S]
    used = (n_words > 0) & (n_image > 0)
    nll = -jnp.sum(token_lp * words, axis=-1) / jnp.maximum(n_words, 1.0)  # [B]
    rows = jnp.sum(used).astype(jnp.float32)
    loss = jnp.sum(jnp.where(used, nll, 0.0)) / jnp.maximum(rows, 1.0)
    return loss, {"bow": loss, "rows": rows,
                  "tokens": jnp.sum(jnp.where(used, n_words, 0.0))}


def check_stage(name: str, losses: Mapping[str, Any], data: Mapping[str, Any],
                transcript_tasks: Any, has_image: bool, *, text_only: bool = False,
                xvila: bool = False) -> None:
    """ValueError unless a stage with the `image_bow` loss can feed it: an image tower, the
    recipe's transcript_tasks, media kept, an OmniLM, one conversation per row."""
    if "image_bow" not in dict(losses):
        return
    if not has_image:
        raise ValueError(f"stage {name!r}: loss 'image_bow' needs a model with an image tower")
    check_transcripts(name, "image_bow", data, transcript_tasks, text_only=text_only,
                      xvila=xvila)
