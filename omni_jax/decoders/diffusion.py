"""Diffusion around the DiT: noise schedule, q_sample, the epsilon / v training loss with
classifier-free-guidance dropout, and a jitted DDIM sampler with guidance.

DDIM follows diffusers' DDIMScheduler ("leading" timestep spacing, steps_offset 0,
set_alpha_to_one): with a = alphas_cumprod[t], a' = alphas_cumprod[t - T // steps] (1 past the
end), x0 = (x - sqrt(1 - a) eps) / sqrt(a) (or sqrt(a) x - sqrt(1 - a) v), optionally clipped,
sigma = eta sqrt((1 - a') / (1 - a) (1 - a / a')), x' = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps
+ sigma z. Guidance: out = uncond + s (cond - uncond), uncond = the learned null conditioning.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.decoders.config import DecoderConfig
from omni_jax.decoders.dit import ApplyFn, check_decoder_inputs


def betas(config: DecoderConfig) -> np.ndarray:
    """[T] float64 betas of the configured schedule (diffusers' linear / scaled_linear /
    squaredcos_cap_v2)."""
    c, n = config, config.num_train_timesteps
    if c.beta_schedule == "linear":
        return np.linspace(c.beta_start, c.beta_end, n, dtype=np.float64)
    if c.beta_schedule == "scaled_linear":
        return np.linspace(c.beta_start ** 0.5, c.beta_end ** 0.5, n, dtype=np.float64) ** 2
    bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - bar((i + 1) / n) / bar(i / n), c.cosine_max_beta)
                     for i in range(n)], np.float64)


def alphas_cumprod(config: DecoderConfig) -> np.ndarray:
    """[T] float64 prod_{s <= t} (1 - beta_s): the signal share of x_t."""
    return np.cumprod(1.0 - betas(config))


def q_sample(x0: jax.Array, t: jax.Array, noise: jax.Array, acp: jax.Array) -> jax.Array:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise; x0, noise [batch, H, W, C], t [batch] int."""
    a = acp[t][:, None, None, None]
    return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise


def diffusion_loss(apply_fn: ApplyFn, params: Any, images: jax.Array, cond: jax.Array,
                   cond_mask: jax.Array, rng: jax.Array, *, config: DecoderConfig) -> jax.Array:
    """Mean squared error of the epsilon (or v = sqrt(a) eps - sqrt(1 - a) x0) prediction at
    uniform random timesteps; each item's conditioning is swapped for the null sequence with
    probability config.cfg_dropout. images [batch, H, W, C] in [-1, 1]; cond [batch, cond_len,
    cond_dim]; cond_mask [batch, cond_len]. Returns a float32 scalar."""
    check_decoder_inputs(config, images.shape, cond.shape, cond_mask.shape)
    b = images.shape[0]
    kt, kn, kd = jax.random.split(rng, 3)
    acp = jnp.asarray(alphas_cumprod(config), jnp.float32)
    t = jax.random.randint(kt, (b,), 0, config.num_train_timesteps)
    x0 = images.astype(jnp.float32)
    noise = jax.random.normal(kn, x0.shape, jnp.float32)
    drop = jax.random.bernoulli(kd, config.cfg_dropout, (b,))
    pred = apply_fn(params, q_sample(x0, t, noise, acp), t, cond, cond_mask, drop)
    if config.prediction == "epsilon":
        target = noise
    else:
        a = acp[t][:, None, None, None]
        target = jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * x0
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))


def ddim_timesteps(config: DecoderConfig, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' "leading" spacing: t_i = (steps - 1 - i) * (T // steps) and t_i - T // steps
    (negative = past the end) for i = 0..steps-1."""
    ratio = config.num_train_timesteps // steps
    ts = (np.arange(steps) * ratio)[::-1].astype(np.int64)
    return ts, ts - ratio


def ddim_step(x: jax.Array, model_out: jax.Array, a_t: jax.Array, a_prev: jax.Array,
              noise: jax.Array, eta: jax.Array | float, *, config: DecoderConfig) -> jax.Array:
    """One DDIM update x_t -> x_{t_prev} given the model's epsilon / v output and the signal
    shares a_t = alphas_cumprod[t], a_prev (1.0 past the end); noise is used when eta > 0."""
    b_t = 1 - a_t
    if config.prediction == "epsilon":
        x0, eps = (x - jnp.sqrt(b_t) * model_out) / jnp.sqrt(a_t), model_out
    else:
        x0 = jnp.sqrt(a_t) * x - jnp.sqrt(b_t) * model_out
        eps = jnp.sqrt(a_t) * model_out + jnp.sqrt(b_t) * x
    if config.clip_sample:
        x0 = jnp.clip(x0, -config.clip_range, config.clip_range)
    sigma = eta * jnp.sqrt((1 - a_prev) / b_t * (1 - a_t / a_prev))
    direction = jnp.sqrt(jnp.maximum(1 - a_prev - sigma ** 2, 0.0)) * eps
    return jnp.sqrt(a_prev) * x0 + direction + sigma * noise


def check_sampler_args(config: DecoderConfig, steps: Any, guidance_scale: Any,
                       eta: Any) -> None:
    """ValueError unless 1 <= steps <= T (an int), guidance_scale is None or >= 0, eta >= 0."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not (
            1 <= steps <= config.num_train_timesteps):
        raise ValueError(f"ddim_sample: steps must be an int in [1, num_train_timesteps="
                         f"{config.num_train_timesteps}], got {steps!r}")
    if guidance_scale is not None and not (isinstance(guidance_scale, numbers.Real)
                                           and guidance_scale >= 0):
        raise ValueError(f"ddim_sample: guidance_scale must be None (conditional only) or a "
                         f"number >= 0, got {guidance_scale!r}")
    if not isinstance(eta, numbers.Real) or eta < 0:
        raise ValueError(f"ddim_sample: eta must be a number >= 0, got {eta!r}")


@functools.partial(jax.jit, static_argnames=("apply_fn", "config", "steps", "guided"))
def _ddim_loop(params: Any, cond: jax.Array, cond_mask: jax.Array, rng: jax.Array,
               scale: jax.Array, eta: jax.Array, *, apply_fn: ApplyFn, config: DecoderConfig,
               steps: int, guided: bool) -> jax.Array:
    acp = alphas_cumprod(config)
    ts, prev = ddim_timesteps(config, steps)
    a_t = jnp.asarray(acp[ts], jnp.float32)  # [steps]
    a_prev = jnp.asarray(np.where(prev >= 0, acp[np.maximum(prev, 0)], 1.0), jnp.float32)
    ts = jnp.asarray(ts, jnp.int32)
    b = cond.shape[0]
    k_init, k_steps = jax.random.split(rng)
    x = jax.random.normal(k_init, (b, *config.image_shape), jnp.float32)  # x_T
    if guided:  # one batched pass: [conditional; null]
        cond2, mask2 = jnp.concatenate([cond, cond]), jnp.concatenate([cond_mask, cond_mask])
        drop2 = jnp.arange(2 * b) >= b

    def body(i: jax.Array, x: jax.Array) -> jax.Array:
        if guided:
            t = jnp.full((2 * b,), ts[i])
            out = apply_fn(params, jnp.concatenate([x, x]), t, cond2, mask2, drop2)
            out = out[b:] + scale * (out[:b] - out[b:])
        else:
            out = apply_fn(params, x, jnp.full((b,), ts[i]), cond, cond_mask, None)
        noise = jax.random.normal(jax.random.fold_in(k_steps, i), x.shape, jnp.float32)
        return ddim_step(x, out, a_t[i], a_prev[i], noise, eta, config=config)

    return jax.lax.fori_loop(0, steps, body, x)


def ddim_sample(apply_fn: ApplyFn, params: Any, cond: jax.Array, cond_mask: jax.Array,
                rng: jax.Array, steps: int, guidance_scale: float | None, eta: float = 0.0, *,
                config: DecoderConfig) -> jax.Array:
    """Images [batch, H, W, C] from x_T ~ N(0, I) in `steps` jitted DDIM steps (lax.fori_loop).

    guidance_scale s: out = uncond + s (cond - uncond) (s = 1: conditional, 0: unconditional);
    None skips the null pass (conditional only, half the work). eta = 0 is deterministic given
    rng; eta > 0 adds DDPM-like noise. apply_fn must be hashable and stable across calls
    (decoder_apply_fn(config)) or every call recompiles.
    """
    check_sampler_args(config, steps, guidance_scale, eta)
    check_decoder_inputs(config, (cond.shape[0], *config.image_shape), cond.shape,
                         cond_mask.shape)
    scale = jnp.float32(1.0 if guidance_scale is None else float(guidance_scale))
    return _ddim_loop(params, cond, cond_mask, rng, scale, jnp.float32(float(eta)),
                      apply_fn=apply_fn, config=config, steps=int(steps),
                      guided=guidance_scale is not None)
