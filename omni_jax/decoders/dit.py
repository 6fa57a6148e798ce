"""DiT (diffusion transformer) image decoder: patchify, 2-D positions, sinusoidal timestep MLP,
adaLN-Zero blocks (self-attention, cross-attention to a conditioning sequence, MLP), final
adaLN + linear, unpatchify. Predicts epsilon or v for noisy images [batch, H, W, C]."""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.decoders.config import DecoderConfig
from omni_jax.layers.attention import Attention, dot_product_attention
from omni_jax.layers.common import constrain, logical_init, parse_dtype
from omni_jax.layers.mlp import GeluMLP
from omni_jax.layers.norms import LayerNorm

_ACT = ("act_batch", "act_len", "act_embed")
# apply_fn(params, x_t, t, cond, cond_mask, drop) -> prediction [batch, H, W, C]
ApplyFn = Callable[..., jax.Array]


def check_decoder_inputs(c: DecoderConfig, x_shape: tuple[int, ...],
                         cond_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> None:
    """ValueError unless x [batch, H, W, C], cond [batch, cond_len, cond_dim] and
    cond_mask [batch, cond_len] match the config and each other."""
    if tuple(x_shape[1:]) != c.image_shape or len(x_shape) != 4:
        raise ValueError(f"decoder: images must be [batch, {c.image_size}, {c.image_size}, "
                         f"{c.channels}], got {tuple(x_shape)}")
    if tuple(cond_shape) != (x_shape[0], c.cond_len, c.cond_dim):
        raise ValueError(f"decoder: cond must be [batch={x_shape[0]}, cond_len={c.cond_len}, "
                         f"cond_dim={c.cond_dim}], got {tuple(cond_shape)}")
    if tuple(mask_shape) != (x_shape[0], c.cond_len):
        raise ValueError(f"decoder: cond_mask must be [batch={x_shape[0]}, cond_len="
                         f"{c.cond_len}], got {tuple(mask_shape)}")


def sincos_1d(pos: np.ndarray, dim: int, max_period: float) -> np.ndarray:
    """[n] positions -> [n, dim]: sin | cos of pos * max_period^(-k / (dim / 2))."""
    omega = max_period ** (-np.arange(dim // 2, dtype=np.float64) / (dim // 2))
    ang = pos.astype(np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)


def sincos_2d(grid: int, dim: int, max_period: float) -> np.ndarray:
    """[grid * grid, dim] fixed positions, row-major tokens: row features | column features."""
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    return np.concatenate([sincos_1d(rows.reshape(-1), dim // 2, max_period),
                           sincos_1d(cols.reshape(-1), dim // 2, max_period)], axis=1)


def timestep_features(t: jax.Array, dim: int, max_period: float) -> jax.Array:
    """[batch] (float) timesteps -> [batch, dim]: cos | sin of t * max_period^(-k / half)."""
    half = dim // 2
    freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    ang = t.astype(jnp.float32)[:, None] * freqs[None]  # [batch, half]
    return jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], axis=-1)


def patchify(x: jax.Array, p: int) -> jax.Array:
    """[batch, H, W, C] -> [batch, (H/p) * (W/p), p * p * C], each patch flattened (row, col, C)."""
    b, h, w, ch = x.shape
    x = x.reshape(b, h // p, p, w // p, p, ch).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * ch)


def unpatchify(x: jax.Array, p: int, grid: int, channels: int) -> jax.Array:
    """The inverse of patchify: [batch, grid^2, p * p * C] -> [batch, grid * p, grid * p, C]."""
    b = x.shape[0]
    x = x.reshape(b, grid, grid, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid * p, grid * p, channels)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without scale / bias (adaLN supplies them), statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """x [batch, seq, embed] * (1 + scale) + shift, per batch item ([batch, embed])."""
    return x * (1 + scale[:, None]) + shift[:, None]


def _dense(c: DecoderConfig, features: int, names: tuple[str | None, str | None], name: str,
           init: jax.nn.initializers.Initializer | None = None) -> nn.Dense:
    init = nn.initializers.normal(c.init_std) if init is None else init
    return nn.Dense(features, dtype=parse_dtype(c.dtype), param_dtype=parse_dtype(c.param_dtype),
                    kernel_init=logical_init(init, names),
                    bias_init=logical_init(nn.initializers.zeros, names[1:]), name=name)


class CrossAttention(nn.Module):
    """Queries from the image tokens, keys / values from the projected conditioning rows."""

    config: DecoderConfig

    def _proj(self, features: tuple[int, ...], names: tuple[str, ...], name: str,
              axis: int | tuple[int, ...] = -1) -> nn.DenseGeneral:
        c = self.config
        return nn.DenseGeneral(features, axis=axis, dtype=parse_dtype(c.dtype),
                               param_dtype=parse_dtype(c.param_dtype),
                               kernel_init=logical_init(nn.initializers.normal(c.init_std), names),
                               bias_init=logical_init(nn.initializers.zeros,
                                                      names[-len(features):]), name=name)

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
        """x [batch, seq, embed]; y [batch, cond_len, embed]; mask [batch, cond_len] (keep)."""
        c = self.config
        hd = (c.heads, c.head_dim)
        q = self._proj(hd, ("embed", "heads", "head_dim"), "q")(x)  # [batch, seq, heads, hd]
        k = self._proj(hd, ("embed", "heads", "head_dim"), "k")(y)  # [batch, cond, heads, hd]
        v = self._proj(hd, ("embed", "heads", "head_dim"), "v")(y)
        q = constrain(q, ("act_batch", "act_len", "act_heads", None))
        out = dot_product_attention(q, k, v, mask[:, None, None, :])  # [batch, seq, heads, hd]
        return self._proj((c.hidden,), ("heads", "head_dim", "embed"), "o", axis=(-2, -1))(out)


class DiTBlock(nn.Module):
    """x += gate_msa * SA(mod(LN x)); x += CA(LN' x, y); x += gate_mlp * MLP(mod(LN x))."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, t_emb: jax.Array, y: jax.Array,
                 mask: jax.Array) -> jax.Array:
        c = self.config
        dt, pdt = parse_dtype(c.dtype), parse_dtype(c.param_dtype)
        # adaLN-Zero: 6 modulation vectors from the time embedding, zero-initialised (identity)
        mods = _dense(c, 6 * c.hidden, ("embed", "mlp"), "modulation", nn.initializers.zeros)(
            jax.nn.silu(t_emb))  # [batch, 6 * embed]
        shift_sa, scale_sa, gate_sa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mods, 6, -1)
        attn = Attention(num_heads=c.heads, num_kv_heads=c.heads, head_dim=c.head_dim,
                         q_bias=True, k_bias=True, v_bias=True, o_bias=True,
                         init_std=c.init_std, dtype=dt, param_dtype=pdt, name="attn")
        h, _ = attn(modulate(layer_norm(x, c.norm_eps), shift_sa, scale_sa))
        x = constrain(x + gate_sa[:, None] * h, _ACT)
        h = LayerNorm(c.norm_eps, dtype=dt, param_dtype=pdt, name="cross_norm")(x)
        x = constrain(x + CrossAttention(c, name="cross")(h, y, mask), _ACT)
        h = GeluMLP(c.mlp_hidden, act="gelu_tanh", init_std=c.init_std, dtype=dt,
                    param_dtype=pdt, name="mlp")(
            modulate(layer_norm(x, c.norm_eps), shift_mlp, scale_mlp))
        return constrain(x + gate_mlp[:, None] * h, _ACT)


class DiT(nn.Module):
    """Noisy images x_t [batch, H, W, C], timesteps t [batch], conditioning [batch, cond_len,
    cond_dim] + mask -> the epsilon / v prediction [batch, H, W, C] (float32).

    `drop` [batch] bool (optional) swaps an item's conditioning for the learned null sequence
    (all rows valid): classifier-free-guidance dropout in training, the unconditional branch
    in sampling.
    """

    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, cond: jax.Array, cond_mask: jax.Array,
                 drop: jax.Array | None = None) -> jax.Array:
        c = self.config
        check_decoder_inputs(c, x.shape, cond.shape, cond_mask.shape)
        b = x.shape[0]
        if t.shape != (b,) or (drop is not None and drop.shape != (b,)):
            raise ValueError(f"DiT: t and drop must be [batch={b}], got {t.shape}, "
                             f"{None if drop is None else drop.shape}")
        dt, pdt = parse_dtype(c.dtype), parse_dtype(c.param_dtype)
        h = _dense(c, c.hidden, ("conv", "embed"), "patch_embed")(
            patchify(x.astype(dt), c.patch_size))  # [batch, patches, embed]
        if c.pos_embed == "sincos":
            pos = jnp.asarray(sincos_2d(c.grid, c.hidden, c.pos_max_period), dt)
        else:
            pos = self.param("pos_embed", logical_init(nn.initializers.normal(c.init_std),
                                                       ("pos", "embed")),
                             (c.num_patches, c.hidden), pdt).astype(dt)
        h = constrain(h + pos[None], _ACT)
        # timestep embedding: sinusoidal features -> Linear -> SiLU -> Linear
        tf = timestep_features(t, c.time_freq_dim, c.time_max_period).astype(dt)
        t_emb = _dense(c, c.hidden, (None, "embed"), "time_fc1")(tf)
        t_emb = _dense(c, c.hidden, ("embed", "mlp"), "time_fc2")(jax.nn.silu(t_emb))
        # conditioning: the learned null sequence where dropped, then a GELU MLP to the width
        null = self.param("null_cond", logical_init(nn.initializers.normal(c.init_std),
                                                    (None, None)), (c.cond_len, c.cond_dim),
                          pdt)
        cond, cond_mask = cond.astype(dt), cond_mask.astype(bool)
        if drop is not None:
            cond = jnp.where(drop[:, None, None], null.astype(dt)[None], cond)
            cond_mask = cond_mask | drop[:, None]
        y = GeluMLP(c.hidden, act="gelu_tanh", init_std=c.init_std, dtype=dt, param_dtype=pdt,
                    out_features=c.hidden, name="cond_proj")(cond)  # [batch, cond_len, embed]
        for i in range(c.layers):
            h = DiTBlock(c, name=f"block_{i}")(h, t_emb, y, cond_mask)
        # final adaLN (shift, scale) + zero-initialised linear to the patch values
        shift, scale = jnp.split(_dense(c, 2 * c.hidden, ("embed", "mlp"), "final_modulation",
                                        nn.initializers.zeros)(jax.nn.silu(t_emb)), 2, -1)
        h = modulate(layer_norm(h, c.norm_eps), shift, scale)
        out = _dense(c, c.patch_dim, ("embed", None), "final_linear", nn.initializers.zeros)(h)
        return unpatchify(out, c.patch_size, c.grid, c.channels).astype(jnp.float32)


@functools.lru_cache(maxsize=64)
def decoder_apply_fn(config: DecoderConfig) -> ApplyFn:
    """The (cached, so jit caches hit) apply_fn(params, x_t, t, cond, cond_mask, drop=None) of
    DiT(config), as diffusion_loss and ddim_sample take it."""
    model = DiT(config)

    def apply_fn(params, x, t, cond, cond_mask, drop=None):
        return model.apply(params, x, t, cond, cond_mask, drop)

    return apply_fn


@functools.lru_cache(maxsize=64)
def _jitted_init(config: DecoderConfig) -> Callable[..., dict]:
    return jax.jit(DiT(config).init)


def init_decoder(config: DecoderConfig, rng: jax.Array, batch: int = 1) -> dict:
    """Jitted DiT(config).init on zero inputs of `batch` items -> the params tree, boxed with
    logical axis names (flax.core.meta.unbox for plain arrays)."""
    x = jnp.zeros((batch, *config.image_shape), jnp.float32)
    cond = jnp.zeros((batch, config.cond_len, config.cond_dim), jnp.float32)
    mask = jnp.ones((batch, config.cond_len), bool)
    return _jitted_init(config)(rng, x, jnp.zeros((batch,), jnp.float32), cond, mask,
                            jnp.zeros((batch,), bool))
