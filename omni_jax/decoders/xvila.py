"""X-VILA's output side: the LLM's hidden states at the K generation-token positions, projected
into the image decoder's conditioning space, plus (optionally) the visual embedding highway
(VEH): the projected highway rows of the source image appended to the conditioning sequence.

  cond  = [ proj(h_gen_1..K) + row_k ; veh_proj(highway_1..P) + row'_p ]   [B, K (+ P), cond_dim]
  mask  = [ True x K                 ; source image given x P        ]

The conditioning then drives the DiT (omni_jax.decoders.dit) for the diffusion loss and DDIM
sampling. The rows get learned row embeddings because the DiT's cross-attention has no
positions of its own (a reproduced image needs to know which highway row is which patch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.config_base import StrictConfig, check_positive, plain_dict
from omni_jax.decoders.config import DecoderConfig
from omni_jax.decoders.diffusion import alphas_cumprod, check_sampler_args, ddim_sample, q_sample
from omni_jax.decoders.dit import decoder_apply_fn
from omni_jax.layers.common import logical_init, parse_dtype
from omni_jax.layers.mlp import GeluMLP

HEAD, DECODER = "xvila_head", "image_decoder"  # their top-level param keys
IN_SHIFT, IN_SCALE = "in_shift", "in_scale"  # the head's calibrated input statistics
PARAM_KEYS = (HEAD, DECODER)


@dataclasses.dataclass(frozen=True)
class XVilaHeadConfig(StrictConfig):
    """Output head + image decoder. The decoder's cond_len must be gen_tokens (+ highway_tokens
    with veh) and its cond_dim the width both projections map to."""

    llm_hidden: int = 32  # D: width of the LLM hidden states
    gen_tokens: int = 4  # K: generation tokens per requested image (template's count)
    proj_hidden: int | None = 128  # output projection: GELU MLP width (None: one Linear)
    # standardise the generation-token states per (token, feature) with statistics calibrated
    # on data (XVilaLM.calibrate), then to RMS ~1 per row: a random or small LLM's states at
    # those positions barely vary (the prompt is ~1% of their spread) and a fresh projection
    # cannot amplify that in a stage's steps; the statistics are params outside the
    # trainable patterns (frozen)
    input_norm: bool = True
    input_norm_eps: float = 1e-6
    input_rms_floor: float = 1.0  # added to the mean square: rows far below unit RMS shrink
    calibration_batches: int = 4  # batches of the stage's data that calibrate them
    veh: bool = False  # append the visual embedding highway rows to the conditioning
    highway_dim: int = 8  # width of OmniModel's highway rows (HighwayConfig.out_dim)
    highway_tokens: int = 16  # P: highway rows per source image (its patch grid)
    init_std: float = 0.02
    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
    dtype: str = "float32"
    param_dtype: str = "float32"

    @classmethod
    def _coerce(cls, d: dict[str, Any]) -> dict[str, Any]:
        if isinstance(d.get("decoder"), Mapping):
            d["decoder"] = DecoderConfig.from_dict(plain_dict(d["decoder"]))
        return d

    def __post_init__(self) -> None:
        who = "XVilaHeadConfig"
        check_positive(who, llm_hidden=self.llm_hidden, gen_tokens=self.gen_tokens,
                       highway_dim=self.highway_dim, highway_tokens=self.highway_tokens,
                       init_std=self.init_std)
        if self.proj_hidden is not None:
            check_positive(who, proj_hidden=self.proj_hidden)
        for flag in ("veh", "input_norm"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{who}.{flag} must be a bool, got {getattr(self, flag)!r}")
        check_positive(who, input_norm_eps=self.input_norm_eps,
                       input_rms_floor=self.input_rms_floor,
                       calibration_batches=self.calibration_batches)
        if not isinstance(self.decoder, DecoderConfig):
            raise ValueError(f"{who}.decoder must be a DecoderConfig (or its dict), got "
                             f"{type(self.decoder).__name__}")
        if self.decoder.cond_len != self.cond_len:
            raise ValueError(f"{who}: decoder.cond_len={self.decoder.cond_len} but the head "
                             f"emits gen_tokens={self.gen_tokens}"
                             + (f" + highway_tokens={self.highway_tokens}" if self.veh else "")
                             + f" = {self.cond_len} rows")
        parse_dtype(self.dtype)
        parse_dtype(self.param_dtype)

    @property
    def cond_len(self) -> int:
        return self.gen_tokens + (self.highway_tokens if self.veh else 0)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "decoder": self.decoder.to_dict()}


class XVilaHead(nn.Module):
    """gen_hidden [B, K, D] (+ highway [B, P, highway_dim], highway_valid [B] bool) ->
    (cond [B, cond_len, cond_dim], cond_mask [B, cond_len])."""

    config: XVilaHeadConfig

    def _rows(self, n: int, name: str) -> jax.Array:
        c = self.config
        return self.param(name, logical_init(nn.initializers.normal(c.init_std), (None, None)),
                          (n, c.decoder.cond_dim), parse_dtype(c.param_dtype))

    @nn.compact
    def __call__(self, gen_hidden: jax.Array, highway: jax.Array | None = None,
                 highway_valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        c = self.config
        b, width = gen_hidden.shape[0], c.decoder.cond_dim
        if gen_hidden.shape[1:] != (c.gen_tokens, c.llm_hidden):
            raise ValueError(f"XVilaHead: gen_hidden must be [batch, {c.gen_tokens}, "
                             f"{c.llm_hidden}], got {tuple(gen_hidden.shape)}")
        dt, pdt = parse_dtype(c.dtype), parse_dtype(c.param_dtype)
        x = gen_hidden.astype(dt)  # [B, K, D]
        if c.input_norm:  # shift 0 / scale 1 until calibrated (the RMS step always runs)
            shape, axes = (c.gen_tokens, c.llm_hidden), (None, None)
            shift = self.param(IN_SHIFT, logical_init(nn.initializers.zeros, axes), shape, pdt)
            scale = self.param(IN_SCALE, logical_init(nn.initializers.ones, axes), shape, pdt)
            x = (x - shift.astype(dt)[None]) * scale.astype(dt)[None]
            # then RMS ~1 per row (x / sqrt(ms + floor): a standardised row ends at ~0.71 with
            # floor 1): an LLM trained after calibration (x2x_textual) moves its
            # states by more than their calibrated spread, and the fixed scale would blow that
            # up (measured: image -> image 27 -> 9 dB PSNR); the direction keeps the content
            x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True)
                                  + c.input_rms_floor)
        if c.proj_hidden is None:
            y = nn.Dense(width, dtype=dt, param_dtype=pdt,
                         kernel_init=nn.initializers.normal(c.init_std), name="out_proj")(x)
        else:
            y = GeluMLP(c.proj_hidden, "gelu", c.init_std, dt, pdt, out_features=width,
                        name="out_proj")(x)
        cond = y + self._rows(c.gen_tokens, "gen_rows").astype(dt)[None]  # [B, K, cond_dim]
        mask = jnp.ones((b, c.gen_tokens), bool)
        if not c.veh:
            return cond, mask
        want = (b, c.highway_tokens, c.highway_dim)
        if highway is None:  # text -> image: the highway rows exist but are masked out
            highway, highway_valid = jnp.zeros(want, dt), jnp.zeros((b,), bool)
        if tuple(highway.shape) != want or highway_valid is None or \
                tuple(highway_valid.shape) != (b,):
            raise ValueError(f"XVilaHead: highway must be {list(want)} with highway_valid "
                             f"[{b}], got {tuple(highway.shape)}, "
                             f"{None if highway_valid is None else tuple(highway_valid.shape)}")
        v = nn.Dense(width, dtype=dt, param_dtype=pdt,
                     kernel_init=nn.initializers.normal(1.0 / np.sqrt(c.highway_dim)),
                     name="veh_proj")(highway.astype(dt))
        v = v + self._rows(c.highway_tokens, "veh_rows").astype(dt)[None]  # [B, P, cond_dim]
        vmask = jnp.broadcast_to(highway_valid.astype(bool)[:, None], (b, c.highway_tokens))
        return jnp.concatenate([cond, v], 1), jnp.concatenate([mask, vmask], 1)


def input_stats(rows: Any, found: Any, eps: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Generation-token states [B, K, D] of the rows with k tokens (found [B]) -> (shift,
    scale) [K, D]: mean and 1 / sqrt(variance + eps) over those rows; None with < 2 rows."""
    x = np.asarray(rows, np.float64)[np.asarray(found, bool)]
    if len(x) < 2:
        return None
    return (x.mean(0).astype(np.float32),
            (1.0 / np.sqrt(x.var(0) + eps)).astype(np.float32))


def check_gen_tokens(input_ids: Any, gen_id: int, k: int) -> np.ndarray:
    """Host-side: every row holds 0 or exactly k generation tokens -> [B] bool (has k)."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    counts = (ids == gen_id).sum(1)
    bad = np.flatnonzero((counts != 0) & (counts != k))
    if bad.size:
        raise ValueError(f"rows {bad.tolist()} hold {counts[bad].tolist()} generation tokens "
                         f"(id {gen_id}); each row needs 0 or exactly gen_tokens={k}")
    return counts == k


def gather_gen_rows(hidden: jax.Array, input_ids: jax.Array, gen_id: int,
                    k: int) -> tuple[jax.Array, jax.Array]:
    """hidden [B, S, D] at the first k positions holding gen_id -> ([B, k, D], found [B] bool);
    rows without k generation tokens give whatever sits first (mask them with `found`)."""
    s = input_ids.shape[1]
    pos = jnp.arange(s)[None]
    is_gen = input_ids == gen_id  # [B, S]
    order = jnp.argsort(jnp.where(is_gen, pos, s + pos), axis=1)[:, :k]  # [B, k]
    rows = jnp.take_along_axis(hidden, order[..., None], axis=1)
    return rows, jnp.sum(is_gen, axis=1) >= k


def pick_highway(highway: jax.Array | None, veh_index: jax.Array | None,
                 batch: int) -> tuple[jax.Array | None, jax.Array]:
    """OmniModel's highway [n_images, P, W] + veh_index [B] (source image per row, -1 none) ->
    ([B, P, W] or None, valid [B] bool)."""
    if highway is None or veh_index is None:
        return None, jnp.zeros((batch,), bool)
    idx = jnp.asarray(veh_index)
    rows = jnp.take(highway, jnp.clip(idx, 0, highway.shape[0] - 1), axis=0)
    return rows, idx >= 0


def per_item_diffusion_loss(params: Any, images: jax.Array, cond: jax.Array,
                            cond_mask: jax.Array, seeds: jax.Array, *,
                            config: DecoderConfig) -> jax.Array:
    """diffusion_loss per item: [B] mean squared epsilon / v error, each item's timestep, noise
    and CFG drop drawn from jax.random.key(seeds[b]) (the batch carries the seeds, so a step
    is a pure function of params and batch). images [B, H, W, C] in [-1, 1]."""
    b = images.shape[0]
    keys = jax.vmap(jax.random.key)(seeds.astype(jnp.uint32))
    kt, kn, kd = (jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys) for i in range(3))
    acp = jnp.asarray(alphas_cumprod(config), jnp.float32)
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, config.num_train_timesteps))(kt)
    x0 = images.astype(jnp.float32)
    noise = jax.vmap(lambda k: jax.random.normal(k, config.image_shape, jnp.float32))(kn)
    drop = jax.vmap(lambda k: jax.random.bernoulli(k, config.cfg_dropout))(kd)
    pred = decoder_apply_fn(config)({"params": params}, q_sample(x0, t, noise, acp), t, cond,
                                    cond_mask, drop)
    if config.prediction == "epsilon":
        target = noise
    else:
        a = acp[t][:, None, None, None]
        target = jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * x0
    return jnp.mean(jnp.square(pred - target).reshape(b, -1), axis=1)


def check_generation(config: XVilaHeadConfig | None, steps: Any, guidance_scale: Any,
                     eta: Any = 0.0, *, image_to_image: bool = False,
                     has_image: bool = False) -> None:
    """ValueError before any compute: no decoder, bad sampler args, or an image -> image
    request without a source image (or from a head without the highway)."""
    if config is None:
        raise ValueError("image generation needs a model with an image decoder (an X-VILA "
                         "output head, omni_jax.train.xvila_model.XVilaLM); this one has none")
    check_sampler_args(config.decoder, steps, guidance_scale, eta)
    if image_to_image and not has_image:
        raise ValueError("an image -> image request needs a source image (batch 'image' and "
                         "'veh_index'), got none")


def generate_images(config: XVilaHeadConfig, params: Mapping[str, Any], gen_hidden: jax.Array,
                    highway: jax.Array | None, highway_valid: jax.Array | None,
                    rng: jax.Array, steps: int, guidance_scale: float | None,
                    eta: float = 0.0) -> jax.Array:
    """Conditioning from the head, then DDIM -> images [B, H, W, C] in [-1, 1]. params holds
    HEAD and DECODER (plain arrays)."""
    check_generation(config, steps, guidance_scale, eta)
    cond, mask = XVilaHead(config).apply({"params": params[HEAD]}, gen_hidden, highway,
                                         highway_valid)
    return ddim_sample(decoder_apply_fn(config.decoder), {"params": params[DECODER]}, cond, mask,
                       rng, steps, guidance_scale, eta, config=config.decoder)


__all__ = ["DECODER", "HEAD", "IN_SCALE", "IN_SHIFT", "PARAM_KEYS", "XVilaHead",
           "XVilaHeadConfig", "check_gen_tokens", "check_generation", "gather_gen_rows",
           "generate_images", "input_stats", "per_item_diffusion_loss", "pick_highway"]
