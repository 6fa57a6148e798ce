"""XVilaLM: OmniLM + X-VILA's output head and DiT image decoder as a TrainModel, its
registered `diffusion` loss, and image generation driven by the LLM.

Params: OmniLM's tree ("llm", towers, "highway") plus "xvila_head" (output projection, VEH
projection) and "image_decoder" (DiT). Which of them train is the stage's trainable patterns
(decoder alignment: "^xvila_head/", "^image_decoder/" with the LLM frozen).

Batch, on top of OmniLM's: input_ids holding K = head.gen_tokens generation tokens (gen_id) per
row that asks for an image; gen_image [B, H, W, C] target images in [-1, 1] (the decoder's
space), gen_image_mask [B] (1 = the row has a target), gen_seed [B] int (each row's diffusion
noise / timestep / CFG-drop seed: the step stays a pure function of params and batch), and for
the VEH veh_index [B] (row b's source image among the batch's `image` items, -1 = none).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.data.gen_image import BATCH_KEYS
from omni_jax.data.template import ChatExample, shift_targets
from omni_jax.decoders.dit import init_decoder
from omni_jax.decoders.xvila import (
    DECODER,
    HEAD,
    IN_SCALE,
    IN_SHIFT,
    PARAM_KEYS,
    XVilaHead,
    XVilaHeadConfig,
    check_gen_tokens,
    check_generation,
    gather_gen_rows,
    generate_images,
    input_stats,
    per_item_diffusion_loss,
    pick_highway,
)
from omni_jax.layers.common import parse_dtype
from omni_jax.model import check_batch
from omni_jax.omni_config import OmniConfig
from omni_jax.train.losses import register_loss
from omni_jax.train.model import Batch
from omni_jax.train.omni_model import OmniLM

GEN_KEYS = BATCH_KEYS  # the image-out batch keys (data.gen_image makes them)
log = logging.getLogger(__name__)


class XVilaLM:
    """OmniLM + output head + image decoder: apply -> OmniLM's outputs (+ diffusion_mse [B],
    diffusion_mask [B] when the batch has gen_image targets)."""

    def __init__(self, config: OmniConfig, head: XVilaHeadConfig, gen_id: int,
                 fused_head_chunk: int | None = None) -> None:
        if head.llm_hidden != config.llm.hidden_size:
            raise ValueError(f"XVilaLM: head.llm_hidden={head.llm_hidden} but the LLM is "
                             f"{config.llm.hidden_size} wide")
        if not 0 <= int(gen_id) < config.llm.vocab_size:
            raise ValueError(f"XVilaLM: gen_id={gen_id} is outside the LLM vocabulary "
                             f"[0, {config.llm.vocab_size})")
        if head.veh:
            if config.highway is None or config.image is None:
                raise ValueError("XVilaLM: head.veh needs an image tower and a visual highway "
                                 "(model 'highway'), the model has none")
            p = tokens_per_image_grid(config)
            if (head.highway_dim, head.highway_tokens) != (config.highway.out_dim, p):
                raise ValueError(f"XVilaLM: the head expects highway rows [{head.highway_tokens}"
                                 f", {head.highway_dim}] but the model's highway gives [{p}, "
                                 f"{config.highway.out_dim}] per image")
        self.config, self.head, self.gen_id = config, head, int(gen_id)
        self.lm = OmniLM(config, fused_head_chunk)
        self.fused_head_chunk = fused_head_chunk
        self.dpo_reference = False
        self.image_decoder_config = head.decoder
        self._forward_jit: Any = None

    # ---- TrainModel ----------------------------------------------------------------------
    def init(self, rng: jax.Array, batch: Batch) -> Any:
        variables = self.lm.init(rng, batch)
        h = self.head
        gen = jnp.zeros((1, h.gen_tokens, h.llm_hidden), jnp.float32)
        hw = jnp.zeros((1, h.highway_tokens, h.highway_dim), jnp.float32) if h.veh else None
        valid = jnp.ones((1,), bool) if h.veh else None
        head = XVilaHead(h).init(jax.random.fold_in(rng, 2), gen, hw, valid)["params"]
        dec = init_decoder(h.decoder, jax.random.fold_in(rng, 3))["params"]
        return {**variables, "params": {**variables["params"], HEAD: head, DECODER: dec}}

    def prepare_params(self, params: Any) -> Any:
        """A previous stage's params: an input-side stage has no head / decoder yet -> fresh."""
        missing = [k for k in PARAM_KEYS if k not in params]
        if not missing:
            return params
        fresh = nn.unbox(self.init(jax.random.key(0), {"input_ids": jnp.zeros((1, 8),
                                                                               jnp.int32)}))
        return {**params, **{k: fresh["params"][k] for k in missing}}

    def needs_calibration(self, params: Any) -> bool:
        """Whether the head's input statistics are still at their init (shift 0, scale 1)."""
        if not self.head.input_norm:
            return False

        def local(x: Any) -> np.ndarray:  # replicated: any process's own copy
            return np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)

        head = params[HEAD]
        return bool(np.all(local(head[IN_SHIFT]) == 0) and np.all(local(head[IN_SCALE]) == 1))

    def calibrate(self, params: Any, batches: Sequence[Batch],
                  shard: Callable[[Batch], Batch] | None = None) -> Any:
        """The head's input statistics from the LLM's generation-token states on real batches
        (rows with K generation tokens; all processes' rows) -> params with them set, the rest
        unchanged. shard: process-local numpy batch -> global arrays (Trainer.shard)."""
        if not self.head.input_norm:
            return params
        h = self.head

        @jax.jit
        def states(p: Any, b: Batch) -> tuple[jax.Array, jax.Array]:
            hidden = self._forward(p, b, logits=False)["hidden"]
            return gather_gen_rows(hidden, b["input_ids"], self.gen_id, h.gen_tokens)

        rows, found = [], []
        for b in batches:
            if jax.process_count() == 1 and not np.any(np.asarray(b["input_ids"]) ==
                                                       self.gen_id):
                continue  # no generation request (processes all run every batch: collectives)
            check_batch(self.config, b)
            b = {k: v for k, v in b.items() if k not in GEN_KEYS}
            r, f = states(params, shard(b) if shard is not None else self.lm._inputs(b))
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                r, f = multihost_utils.process_allgather((r, f), tiled=True)
            rows.append(np.asarray(r)), found.append(np.asarray(f))
        stats = input_stats(np.concatenate(rows), np.concatenate(found),
                            h.input_norm_eps) if rows else None
        if stats is None:  # the stage's head trains on raw states; a later stage calibrates
            log.warning("X-VILA head: fewer than 2 rows with generation tokens in %d "
                        "calibration batch(es); its input statistics stay uncalibrated",
                        len(batches))
            return params
        dt = parse_dtype(h.param_dtype)
        shift, scale = (jnp.asarray(x, dt) for x in stats)
        return {**params, HEAD: {**params[HEAD], IN_SHIFT: shift, IN_SCALE: scale}}

    def _forward(self, params: Any, batch: Batch, logits: bool = True) -> dict[str, Any]:
        lm_params = {k: v for k, v in params.items() if k not in PARAM_KEYS}
        return self.lm.module.apply({"params": lm_params}, self.lm._inputs(batch),
                                    compute_logits=logits and self.fused_head_chunk is None)

    def conditioning(self, params: Any, out: Mapping[str, Any], batch: Batch
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """LLM outputs -> (cond [B, L, cond_dim], cond_mask [B, L], has_gen [B])."""
        h = self.head
        rows, found = gather_gen_rows(out["hidden"], batch["input_ids"], self.gen_id,
                                      h.gen_tokens)
        hw, valid = pick_highway(out.get("highway"), batch.get("veh_index"), rows.shape[0])
        cond, mask = XVilaHead(h).apply({"params": params[HEAD]}, rows,
                                        hw if h.veh else None, valid if h.veh else None)
        return cond, mask, found

    def apply(self, params: Any, batch: Batch, *, train: bool = True) -> dict[str, Any]:
        del train  # no dropout
        out = self._forward(params, batch)
        result = {k: v for k, v in out.items() if k not in ("cache", "logits", "hidden")}
        if self.fused_head_chunk is None:
            result.update(logits=out["logits"], hidden=None)
        else:
            llm = params["llm"]
            kernel = (jnp.transpose(llm["embed"]["embedding"]) if
                      self.config.llm.tie_word_embeddings else llm["lm_head"]["kernel"])
            result.update(hidden=out["hidden"], lm_head=kernel)
        if batch.get("gen_image") is not None:
            cond, mask, found = self.conditioning(params, out, batch)
            mse = per_item_diffusion_loss(params[DECODER], batch["gen_image"], cond, mask,
                                          batch["gen_seed"], config=self.head.decoder)
            result["diffusion_mse"] = mse
            result["diffusion_mask"] = found & (batch["gen_image_mask"] > 0)
        return result

    def flops_per_token(self, seq_len: int) -> float:
        return self.lm.flops_per_token(seq_len)

    # ---- generation ------------------------------------------------------------------------
    def check_request(self, batch: Batch) -> np.ndarray:
        """Host-side batch checks before compute -> has_gen [B] (rows with K gen tokens)."""
        check_batch(self.config, batch)
        found = check_gen_tokens(batch["input_ids"], self.gen_id, self.head.gen_tokens)
        if not found.all():
            raise ValueError(f"generate: rows {np.flatnonzero(~found).tolist()} hold no "
                             f"generation tokens; append gen_tokens={self.head.gen_tokens} "
                             f"generation tokens (template part {{'type': 'gen_image'}})")
        return found

    def generate(self, params: Any, batch: Batch, rng: jax.Array, *, steps: int,
                 guidance_scale: float | None, eta: float = 0.0,
                 image_to_image: bool = False) -> jax.Array:
        """One LLM pass over prompts that end in the K generation tokens, then DDIM ->
        images [B, H, W, C] in [-1, 1]. image_to_image: rows reproduce / edit their veh_index
        source image (the VEH carries its features when the head has it)."""
        has_image = batch.get("image") is not None and batch.get("veh_index") is not None
        check_generation(self.head, steps, guidance_scale, eta,
                         image_to_image=image_to_image, has_image=has_image)
        if has_image and np.any(np.asarray(batch["veh_index"]) < 0) and image_to_image:
            raise ValueError("an image -> image request needs veh_index >= 0 on every row")
        self.check_request(batch)
        if self._forward_jit is None:  # compiled once per model and batch shapes
            self._forward_jit = jax.jit(lambda p, b: {
                k: v for k, v in self._forward(p, b, logits=False).items()
                if k in ("hidden", "highway")})
        out = self._forward_jit(params, self.lm._inputs(batch))
        rows, _ = gather_gen_rows(out["hidden"], jnp.asarray(batch["input_ids"]), self.gen_id,
                                  self.head.gen_tokens)
        hw, valid = pick_highway(out.get("highway"), batch.get("veh_index"), rows.shape[0])
        veh = self.head.veh
        return generate_images(self.head, params, rows, hw if veh else None,
                               valid if veh else None, rng, steps, guidance_scale, eta)


def make_gen_batch(examples: Sequence[ChatExample], seq_len: int, pad_id: int, *,
                   targets: np.ndarray | None = None, seeds: np.ndarray | None = None,
                   images: np.ndarray | None = None,
                   veh_index: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Stack rendered conversations (data.template, right-padded to seq_len, next-token targets)
    with target images [B, H, W, C] in [-1, 1] (+ per-row seeds), encoder inputs `images`
    [n, H', W', 3] and veh_index [B] -> an XVilaLM batch (numpy)."""
    rows = [e.pad(seq_len, pad_id) for e in examples]
    ids = np.stack([r.input_ids for r in rows])
    tgt, mask = shift_targets(ids, np.stack([r.loss_mask for r in rows]), pad_id)
    batch = {"input_ids": ids, "targets": tgt, "loss_mask": mask,
             "modality": np.stack([r.modality for r in rows])}
    if targets is not None:
        n = len(rows)
        batch.update(gen_image=np.asarray(targets, np.float32),
                     gen_image_mask=np.ones((n,), np.int32),
                     gen_seed=np.arange(n, dtype=np.int32) if seeds is None
                     else np.asarray(seeds, np.int32))
    if images is not None:
        batch["image"] = np.asarray(images, np.float32)
        batch["veh_index"] = (np.arange(len(rows), dtype=np.int32) if veh_index is None
                              else np.asarray(veh_index, np.int32))
    return batch


def tokens_per_image_grid(config: OmniConfig) -> int:
    """Highway rows per image: the vision encoder's patch grid (OmniModel.visual_features)."""
    gh, gw = config.encoder_config("image").grid(*config.image.image_size)
    return gh * gw


def image_to_unit(images: Any) -> np.ndarray:
    """Decoder images in [-1, 1] -> float [0, 1] (PSNR / SSIM / PNG space)."""
    return np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)


@register_loss("diffusion")
def diffusion(outputs: Mapping[str, Any], batch: Mapping[str, jax.Array]
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean diffusion MSE over the rows with a target image (outputs of XVilaLM.apply)."""
    if "diffusion_mse" not in outputs:
        raise ValueError("loss 'diffusion' needs XVilaLM outputs on a batch with gen_image "
                         "targets (gen_image, gen_image_mask, gen_seed)")
    mask = outputs["diffusion_mask"].astype(jnp.float32)
    n = jnp.sum(mask)
    loss = jnp.sum(outputs["diffusion_mse"] * mask) / jnp.maximum(n, 1.0)
    return loss, {"mse": loss, "images": n}


def generate_image(model: Any, params: Any, batch: Batch, rng: jax.Array, **kw: Any
                   ) -> jax.Array:
    """model.generate for an XVilaLM; ValueError for a model without an image decoder."""
    if not isinstance(model, XVilaLM):
        check_generation(None, 1, None)  # raises: no decoder
    return model.generate(params, batch, rng, **kw)


__all__ = ["GEN_KEYS", "XVilaLM", "diffusion", "generate_image", "image_to_unit",
           "make_gen_batch", "tokens_per_image_grid"]
