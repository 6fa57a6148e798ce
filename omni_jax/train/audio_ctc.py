"""Auxiliary CTC on the LLM's audio input tokens: hybrid CTC / attention ASR (Watanabe et al.,
2017) for an audio tower trained from scratch.

A tower trained only through the LLM's next-token loss learns slowly where each word sits: the
demo's from-scratch Whisper reads the first spoken digit (fixed position) but not the rest.
`audio_ctc` scores each audio token of a transcribed clip against the transcript with CTC,
classifying the token by its cosine to the LLM's own output head (tied: the token
embeddings), plus a fixed blank logit (a frame is blank unless it is nearer than `blank_cos`
to a word). It adds no parameters and turns audio tokens towards the text embeddings of the
words they carry, which the LLM already reads, without touching their norm. A stage with only
this loss costs no LLM pass: its outputs are unused and XLA drops them (its MFU / tokens
metrics still count the LLM). Cost: fp32 [rows, max_frames, vocab] log-probs (qwen7b, 256
frames: ~0.64 GB of temporaries per row); SCALE / BLANK_COS were tuned at vocab 512.

Batch: `transcript_mask` [batch, seq] (data.omni.OmniEncoder with `transcript_tasks`) marks the
transcript tokens of input_ids (the record's assistant answers, every turn, without special
tokens such as <|im_end|>); audio tokens are the
positions with modality == audio. One conversation per row (packing off, checked at plan
time). Rows with more audio tokens than `max_frames` or transcript tokens than `max_labels`
are left out (counted as "overflow"), never truncated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.data.packing import MEDIA_CODES
from omni_jax.train.losses import register_loss
from omni_jax.train.speech_losses import _require, _with_check, ctc_nll

AUDIO_CODE = MEDIA_CODES["audio"]  # data.template's modality id of audio placeholders
TRANSCRIPT_KEY = "transcript_mask"
TRANSCRIPT_LOSSES = ("audio_ctc", "image_bow")  # the losses that read batch[TRANSCRIPT_KEY]
# cosine classifier: logits = SCALE * cos(audio token, embedding); the blank's = SCALE * BLANK_COS
SCALE, BLANK_COS = 24.0, 0.5


def _check(*, max_frames: int = 0, max_labels: int = 0, zero_infinity: bool = True,
           head_grad: bool = False, scale: float = SCALE, blank_cos: float = BLANK_COS) -> None:
    caps = (max_frames, max_labels)
    if any(isinstance(c, bool) or not isinstance(c, int) or c <= 0 for c in caps):
        raise ValueError(f"loss 'audio_ctc': max_frames and max_labels must be positive ints "
                         f"(static per-row caps: audio tokens, transcript tokens), got "
                         f"{max_frames!r}, {max_labels!r}")
    if not all(isinstance(f, bool) for f in (zero_infinity, head_grad)):
        raise ValueError(f"loss 'audio_ctc': zero_infinity and head_grad must be bools, got "
                         f"{zero_infinity!r}, {head_grad!r}")
    ok = all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
             for x in (scale, blank_cos))
    if not ok or not scale > 0 or not -1.0 <= blank_cos <= 1.0:
        raise ValueError(f"loss 'audio_ctc': scale must be a finite number > 0 and blank_cos "
                         f"in [-1, 1], got {scale!r}, {blank_cos!r}")


def left_pack(mask: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """mask [B, S] -> (positions [B, width] of its True entries first, in order; their mask)."""
    order = jnp.argsort(jnp.logical_not(mask).astype(jnp.int32), axis=-1, stable=True)
    order = order[:, :width]
    return order, jnp.take_along_axis(mask, order, axis=-1)


def audio_frames(embeds: jax.Array, modality: jax.Array, max_frames: int
                 ) -> tuple[jax.Array, jax.Array]:
    """The audio tokens of each row, in order -> (frames [B, max_frames, D], their mask)."""
    pos, mask = left_pack(modality == AUDIO_CODE, int(max_frames))
    return jnp.take_along_axis(embeds, pos[..., None], axis=1), mask


def greedy_decode(log_probs: np.ndarray, frame_mask: np.ndarray) -> list[list[int]]:
    """CTC best path per row: the argmax of each real frame, repeats merged, blanks (the last
    index) dropped -> token ids."""
    blank = log_probs.shape[-1] - 1
    out = []
    for lp, m in zip(np.asarray(log_probs), np.asarray(frame_mask, bool)):
        best = lp[m].argmax(-1)
        keep = np.concatenate([[True], best[1:] != best[:-1]]) & (best != blank)
        out.append([int(t) for t in best[keep]])
    return out


def audio_ctc_log_probs(embeds: jax.Array, kernel: jax.Array, scale: float = SCALE,
                        blank_cos: float = BLANK_COS) -> jax.Array:
    """Audio tokens [B, F, D], output head [D, V] -> log-probs [B, F, V + 1], fp32: logits
    scale * cosine(token, head column), the blank (last) scale * blank_cos. Cosine, not a dot
    product: with dot products the tower grew its tokens' norm (154 vs the text embeddings'
    0.6) and the LLM reading them degraded."""
    x = embeds.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)
    # the head in its own dtype (no fp32 copy of a [D, V] matrix), fp32 accumulation; its
    # column norms divide the logits
    dots = jnp.einsum("bfd,dv->bfv", x.astype(kernel.dtype), kernel,
                      preferred_element_type=jnp.float32)
    inv = jax.lax.rsqrt(jnp.sum(jnp.square(kernel.astype(jnp.float32)), axis=0) + 1e-12)
    logits = scale * dots * inv
    blank = jnp.full((*logits.shape[:2], 1), scale * blank_cos, jnp.float32)
    return jax.nn.log_softmax(jnp.concatenate([logits, blank], axis=-1), axis=-1)


@register_loss("audio_ctc")
@_with_check(_check)
def audio_ctc_loss(outputs: Mapping[str, Any], batch: Mapping[str, jax.Array], *,
                   max_frames: int = 0, max_labels: int = 0, zero_infinity: bool = True,
                   head_grad: bool = False, scale: float = SCALE,
                   blank_cos: float = BLANK_COS) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sum of per-row CTC nll over transcribed rows / their transcript tokens. head_grad:
    also train the output head (the LLM's token embeddings when tied) on this loss; off, the
    embeddings are fixed targets and only the audio path moves."""
    _check(max_frames=max_frames, max_labels=max_labels, zero_infinity=zero_infinity,
           head_grad=head_grad, scale=scale, blank_cos=blank_cos)
    _require("audio_ctc", "outputs", outputs, ("inputs_embeds", "lm_head"))
    _require("audio_ctc", "batch", batch, ("input_ids", "modality", TRANSCRIPT_KEY))
    audio = batch["modality"] == AUDIO_CODE  # [B, S]
    words = batch[TRANSCRIPT_KEY] > 0
    n_frames = jnp.sum(audio, axis=-1)
    n_labels = jnp.sum(words, axis=-1)
    frames, fmask = audio_frames(outputs["inputs_embeds"], batch["modality"], max_frames)
    lpos, lmask = left_pack(words, int(max_labels))
    labels = jnp.take_along_axis(batch["input_ids"], lpos, axis=-1)
    overflow = (n_frames > max_frames) | (n_labels > max_labels)
    used = (n_labels > 0) & (n_frames > 0) & ~overflow
    head = outputs["lm_head"] if head_grad else jax.lax.stop_gradient(outputs["lm_head"])
    log_probs = audio_ctc_log_probs(frames, head, scale, blank_cos)  # [B, F, V + 1]
    nll, feasible = ctc_nll(log_probs, fmask, labels, lmask & used[:, None],
                            zero_infinity=zero_infinity)
    tokens = jnp.sum(jnp.where(used, n_labels, 0).astype(jnp.float32))
    loss = jnp.sum(nll) / jnp.maximum(tokens, 1.0)
    return loss, {"ctc": loss, "rows": jnp.sum(used).astype(jnp.float32), "tokens": tokens,
                  "overflow": jnp.sum(overflow & (n_labels > 0)).astype(jnp.float32),
                  "infeasible": jnp.sum(used & ~feasible).astype(jnp.float32)}


def check_stage(name: str, losses: Mapping[str, Any], data: Mapping[str, Any],
                transcript_tasks: Any, audio_tokens: int | None, *, text_only: bool = False,
                xvila: bool = False) -> None:
    """ValueError unless a stage with the `audio_ctc` loss can feed it: an audio tower whose
    clips fit max_frames (audio_tokens: tokens per clip, None = no audio tower), the recipe's
    transcript_tasks (a sequence of task names the encoder marks), media kept (not
    text_only), an OmniLM (XVilaLM returns no output head), one conversation per row."""
    if "audio_ctc" not in dict(losses):
        return
    spec = dict(losses)["audio_ctc"]
    max_frames = dict(spec).get("max_frames") if isinstance(spec, Mapping) else None
    if audio_tokens is None:
        raise ValueError(f"stage {name!r}: loss 'audio_ctc' needs a model with an audio tower")
    if isinstance(max_frames, int) and max_frames < audio_tokens:
        raise ValueError(f"stage {name!r}: audio_ctc max_frames={max_frames} is below the "
                         f"{audio_tokens} audio tokens of one clip: every row would be left "
                         f"out; set max_frames >= {audio_tokens} x clips per record")
    check_transcripts(name, "audio_ctc", data, transcript_tasks, text_only=text_only,
                      xvila=xvila)


def check_transcripts(name: str, loss: str, data: Mapping[str, Any], transcript_tasks: Any, *,
                      text_only: bool = False, xvila: bool = False) -> None:
    """What every loss on `transcript_mask` needs (audio_ctc, image_bow): the omni model with
    its media (not text_only, not X-VILA's), the recipe's transcript_tasks as a non-empty
    sequence of task names, one conversation per row (packing off)."""
    if text_only or xvila:
        raise ValueError(f"stage {name!r}: loss {loss!r} needs the omni model with its "
                         f"media (text_only={text_only}, xvila_output={xvila})")
    if isinstance(transcript_tasks, str):
        raise ValueError(f"stage {name!r}: transcript_tasks must be a sequence of task names, "
                         f"got the string {transcript_tasks!r}")
    if not transcript_tasks:
        raise ValueError(f"stage {name!r}: loss {loss!r} needs the recipe's "
                         "transcript_tasks (record tasks whose answer transcribes the audio "
                         "or captions the image, e.g. ('speech_asr', 'image_caption')); it is "
                         "empty")
    if data.get("packing"):
        raise ValueError(f"stage {name!r}: loss {loss!r} needs packing=False (one "
                         "conversation per row: a row's media tokens and transcript must be "
                         "one example's)")
