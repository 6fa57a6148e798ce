"""BEATs audio encoder as microsoft/unilm's `beats/` computes it (Ola's second audio encoder).

waveform * 2^15 -> `torchaudio.compliance.kaldi.fbank` (povey window, preemphasis 0.97, DC
removal, dither 0, power spectrum, 128 Kaldi mel bins, log with float32-eps floor, snip_edges)
-> (fbank - 15.41663) / (2 * 6.55582) -> Conv2d 16x16 patch embed over (time, freq), tokens
time-major -> LayerNorm -> post_extract_proj -> padded tokens zeroed -> x + GELU(weight-normed
grouped conv) -> [LayerNorm if post-LN] -> layers with the gated relative position bias (one
bucket table, layer 0's, shared by every layer; a per-layer gate from the unscaled queries) ->
[LayerNorm if pre-LN]. Padding masks follow unilm's `forward_padding_mask`: samples -> frames ->
tokens by trimming the remainder and grouping consecutive entries (a group is padded iff all of
it is). Only difference: padded tokens of the output are zeroed (unilm leaves them as computed).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.config_base import StrictConfig, check_choice, check_positive
from omni_jax.layers.common import constrain, logical_init, parse_dtype
from omni_jax.layers.norms import LayerNorm

_ACT = ("act_batch", "act_len", "act_embed")
_F32_EPS = float(np.finfo(np.float32).eps)  # torchaudio's log floor (torch.finfo(float).eps)
ACTIVATIONS = {  # unilm's get_activation_fn names ("glu" changes fc1's shape: unsupported)
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_accurate": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "linear": lambda x: x,
}


@dataclasses.dataclass(frozen=True)
class BEATsConfig(StrictConfig):
    """Front end + encoder hyper-parameters. Feature and rel-pos defaults: the released
    BEATs_iter3 cfg; sizes default tiny (iter3: embed 512, width 768, 12 layers, FFN 3072,
    12 heads, conv_pos 128, groups 16)."""

    sample_rate: int = 16000
    num_mel_bins: int = 128
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    preemphasis: float = 0.97
    low_freq: float = 20.0
    high_freq: float = 0.0  # <= 0: offset from Nyquist (Kaldi convention)
    waveform_scale: float = 32768.0  # BEATs feeds int16-range samples to Kaldi fbank
    fbank_mean: float = 15.41663
    fbank_std: float = 6.55582
    patch_size: int = 16  # unilm: input_patch_size
    conv_bias: bool = False  # patch embedding bias
    embed_dim: int = 64  # patch embedding width
    encoder_embed_dim: int = 64  # transformer width
    encoder_layers: int = 2
    encoder_attention_heads: int = 4
    encoder_ffn_embed_dim: int = 128
    activation_fn: str = "gelu"
    layer_norm_first: bool = False  # False: post-LN (the released checkpoints)
    deep_norm: bool = True  # residual * (2 * layers) ** 0.25 in post-LN layers
    conv_pos: int = 16  # positional conv kernel
    conv_pos_groups: int = 4
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True  # gate the relative position bias per head and query
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_positive("BEATsConfig", sample_rate=self.sample_rate,
                       num_mel_bins=self.num_mel_bins, frame_length_ms=self.frame_length_ms,
                       frame_shift_ms=self.frame_shift_ms, fbank_std=self.fbank_std,
                       patch_size=self.patch_size, embed_dim=self.embed_dim,
                       encoder_embed_dim=self.encoder_embed_dim,
                       encoder_layers=self.encoder_layers,
                       encoder_attention_heads=self.encoder_attention_heads,
                       encoder_ffn_embed_dim=self.encoder_ffn_embed_dim, conv_pos=self.conv_pos,
                       conv_pos_groups=self.conv_pos_groups, num_buckets=self.num_buckets,
                       max_distance=self.max_distance, layer_norm_eps=self.layer_norm_eps,
                       init_std=self.init_std, waveform_scale=self.waveform_scale)
        if self.num_mel_bins % self.patch_size:
            raise ValueError(f"BEATsConfig: patch_size={self.patch_size} must divide "
                             f"num_mel_bins={self.num_mel_bins}")
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise ValueError(f"BEATsConfig: encoder_attention_heads="
                             f"{self.encoder_attention_heads} must divide encoder_embed_dim="
                             f"{self.encoder_embed_dim}")
        if self.encoder_embed_dim % self.conv_pos_groups:
            raise ValueError(f"BEATsConfig: conv_pos_groups={self.conv_pos_groups} must divide "
                             f"encoder_embed_dim={self.encoder_embed_dim}")
        if self.deep_norm and self.layer_norm_first:
            raise ValueError("BEATsConfig: deep_norm needs post-LN layers (layer_norm_first="
                             "False), as unilm asserts")
        if self.relative_position_embedding and (
                self.num_buckets < 4 or self.max_distance <= self.num_buckets // 4):
            raise ValueError(f"BEATsConfig: relative position buckets need num_buckets >= 4 and "
                             f"max_distance > num_buckets // 4, got num_buckets="
                             f"{self.num_buckets}, max_distance={self.max_distance}")
        if not 0.0 <= self.preemphasis < 1.0:
            raise ValueError(f"BEATsConfig.preemphasis must be in [0, 1), got {self.preemphasis}")
        if self.window_size < 2 or self.window_shift < 1:
            raise ValueError("BEATsConfig: frame_length_ms / frame_shift_ms give an empty window")
        nyq = self.sample_rate / 2
        hi = self.high_freq if self.high_freq > 0 else nyq + self.high_freq
        if not 0.0 <= self.low_freq < hi <= nyq:
            raise ValueError(f"BEATsConfig: need 0 <= low_freq < high_freq <= Nyquist ({nyq}), "
                             f"got low_freq={self.low_freq}, high_freq={hi}")
        check_choice("BEATsConfig", "activation_fn", self.activation_fn, tuple(ACTIVATIONS))
        parse_dtype(self.dtype)
        parse_dtype(self.param_dtype)

    @property
    def window_size(self) -> int:
        return int(self.sample_rate * self.frame_length_ms * 0.001)

    @property
    def window_shift(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms * 0.001)

    @property
    def head_dim(self) -> int:
        return self.encoder_embed_dim // self.encoder_attention_heads

    def num_frames(self, num_samples: int) -> int:
        """Kaldi frames (snip_edges=True) of a waveform of `num_samples` samples."""
        if num_samples < self.window_size:
            return 0
        return 1 + (num_samples - self.window_size) // self.window_shift

    def num_tokens(self, num_samples: int) -> int:
        """Output tokens: (frames // patch) time blocks x (mel / patch) frequency blocks."""
        return self.tokens_of_frames(self.num_frames(num_samples))

    def tokens_of_frames(self, frames: int) -> int:
        return frames // self.patch_size * (self.num_mel_bins // self.patch_size)


def kaldi_mel_banks(c: BEATsConfig) -> np.ndarray:
    """Kaldi triangular mel filters on the (power-of-two) FFT grid: [n_fft // 2 + 1, mels]."""
    n_fft = 1 << (c.window_size - 1).bit_length()
    mel = lambda f: 1127.0 * np.log(1.0 + np.asarray(f, np.float64) / 700.0)  # noqa: E731
    high = c.high_freq if c.high_freq > 0 else c.sample_rate / 2 + c.high_freq
    lo, hi = mel(c.low_freq), mel(high)
    delta = (hi - lo) / (c.num_mel_bins + 1)
    b = np.arange(c.num_mel_bins)[:, None]
    left, center, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
    m = mel(c.sample_rate / n_fft * np.arange(n_fft // 2))[None, :]
    tri = np.maximum(0.0, np.minimum((m - left) / (center - left), (right - m) / (right - center)))
    tri = np.concatenate([tri, np.zeros((c.num_mel_bins, 1))], axis=1)  # Nyquist bin: 0
    return tri.T.astype(np.float32)


def kaldi_fbank(waveform: jax.Array, c: BEATsConfig) -> jax.Array:
    """Kaldi log-mel fbank of already-scaled samples: [batch, samples] -> [batch, frames, mels]."""
    n_frames = c.num_frames(waveform.shape[-1])
    if n_frames == 0:
        raise ValueError(f"kaldi_fbank: need at least {c.window_size} samples per waveform, "
                         f"got {waveform.shape[-1]}")
    win, n_fft = c.window_size, 1 << (c.window_size - 1).bit_length()
    idx = np.arange(n_frames)[:, None] * c.window_shift + np.arange(win)[None, :]
    x = waveform.astype(jnp.float32)[:, idx]  # [batch, frames, win]
    x = x - jnp.mean(x, axis=-1, keepdims=True)  # remove DC offset
    prev = jnp.concatenate([x[..., :1], x[..., :-1]], axis=-1)  # replicate-padded shift
    x = x - c.preemphasis * prev
    n = np.arange(win)
    povey = (0.5 - 0.5 * np.cos(2 * np.pi * n / (win - 1))) ** 0.85
    x = x * jnp.asarray(povey, jnp.float32)
    spec = jnp.fft.rfft(x, n=n_fft, axis=-1)  # [batch, frames, n_fft // 2 + 1]
    power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
    mel = jnp.einsum("bfk,km->bfm", power, jnp.asarray(kaldi_mel_banks(c)),
                     precision=jax.lax.Precision.HIGHEST)
    return jnp.log(jnp.maximum(mel, _F32_EPS))


def beats_fbank(waveform: jax.Array, c: BEATsConfig) -> jax.Array:
    """BEATs.preprocess: normalized Kaldi fbank of waveform * 2^15 -> [b, frames, mels]."""
    fb = kaldi_fbank(waveform * c.waveform_scale, c)
    return (fb - c.fbank_mean) / (2.0 * c.fbank_std)


def reduce_padding_mask(mask: jax.Array, n: int) -> jax.Array:
    """unilm's forward_padding_mask: [b, L] (True = padded) -> [b, n]; drop L % n trailing
    entries, entry i is padded iff all of its L // n consecutive inputs are."""
    usable = mask.shape[1] // n * n
    return jnp.all(mask[:, :usable].reshape(mask.shape[0], n, -1), axis=-1)


def relative_position_buckets(n: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of rel = key - query for rel in [-(n-1), n-1] -> [2n - 1] int32 (unilm's
    bidirectional T5 bucketing, large-distance branch in float32 and truncated like torch)."""
    rel = np.arange(-(n - 1), n)
    half = num_buckets // 2
    exact = half // 2
    d = np.abs(rel)
    safe = np.maximum(d, 1).astype(np.float32)
    large = (np.log(safe / np.float32(exact)) / np.float32(math.log(max_distance / exact))
             * np.float32(half - exact)).astype(np.int64) + exact  # float -> int truncates
    large = np.minimum(large, half - 1)
    return ((rel > 0) * half + np.where(d < exact, d, large)).astype(np.int32)


class BEATsAttention(nn.Module):
    """unilm MultiheadAttention (self-attention, all biases) with the gated relative bias."""

    config: BEATsConfig

    @nn.compact
    def __call__(self, x: jax.Array, pos_bias: jax.Array | None,
                 key_valid: jax.Array) -> jax.Array:  # x [b, n, d]; pos_bias [heads, n, n]
        c = self.config
        h, hd, dt, pdt = c.encoder_attention_heads, c.head_dim, parse_dtype(c.dtype), \
            parse_dtype(c.param_dtype)
        init = nn.initializers.normal(c.init_std)

        def proj(name: str) -> jax.Array:  # [b, n, heads, head_dim]
            return nn.DenseGeneral((h, hd), dtype=dt, param_dtype=pdt, name=name,
                                   kernel_init=logical_init(init, ("embed", "heads", "head_dim")),
                                   bias_init=logical_init(nn.initializers.zeros,
                                                          ("heads", "head_dim")))(x)

        q, k, v = proj("q"), proj("k"), proj("v")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q * (hd ** -0.5), k,
                            preferred_element_type=jnp.float32)  # [b, heads, n, n]
        if c.gru_rel_pos:  # gate from the unscaled per-head queries: [b, n, heads, 8]
            g = nn.Dense(8, dtype=dt, param_dtype=pdt, name="grep_linear",
                         kernel_init=logical_init(init, ("head_dim", None)),
                         bias_init=logical_init(nn.initializers.zeros, (None,)))(q)
            g = jax.nn.sigmoid(g.astype(jnp.float32).reshape(*g.shape[:3], 2, 4).sum(-1))
            grep_a = self.param("grep_a", logical_init(nn.initializers.ones, ("heads",)),
                                (h,), pdt).astype(jnp.float32)
            gate = g[..., 0] * (g[..., 1] * grep_a - 1.0) + 2.0  # [b, n, heads]
        if pos_bias is not None:
            bias = pos_bias[None].astype(jnp.float32)  # [1, heads, n, n]
            if c.gru_rel_pos:
                bias = jnp.transpose(gate, (0, 2, 1))[..., None] * bias  # [b, heads, n, n]
            scores = scores + bias
        scores = jnp.where(key_valid[:, None, None, :], scores,
                           jnp.float32(-0.7 * jnp.finfo(jnp.float32).max))
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # [b, n, heads, head_dim]
        out = constrain(out, ("act_batch", "act_len", "act_heads", None))
        return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), dtype=dt, param_dtype=pdt, name="o",
                               kernel_init=logical_init(init, ("heads", "head_dim", "embed")),
                               bias_init=logical_init(nn.initializers.zeros, ("embed",)))(out)


class BEATsLayer(nn.Module):
    """unilm TransformerSentenceEncoderLayer: post-LN (optionally deep-norm) or pre-LN."""

    config: BEATsConfig

    @nn.compact
    def __call__(self, x: jax.Array, pos_bias: jax.Array | None,
                 key_valid: jax.Array) -> jax.Array:  # [b, n, d]
        c = self.config
        dt, pdt = parse_dtype(c.dtype), parse_dtype(c.param_dtype)
        init = nn.initializers.normal(c.init_std)
        attn = BEATsAttention(c, name="attn")
        norm1 = LayerNorm(c.layer_norm_eps, dtype=dt, param_dtype=pdt, name="attn_norm")
        norm2 = LayerNorm(c.layer_norm_eps, dtype=dt, param_dtype=pdt, name="mlp_norm")

        def mlp(y: jax.Array) -> jax.Array:
            y = nn.Dense(c.encoder_ffn_embed_dim, dtype=dt, param_dtype=pdt, name="fc1",
                         kernel_init=logical_init(init, ("embed", "mlp")),
                         bias_init=logical_init(nn.initializers.zeros, ("mlp",)))(y)
            y = constrain(ACTIVATIONS[c.activation_fn](y), ("act_batch", "act_len", "act_mlp"))
            return nn.Dense(x.shape[-1], dtype=dt, param_dtype=pdt, name="fc2",
                            kernel_init=logical_init(init, ("mlp", "embed")),
                            bias_init=logical_init(nn.initializers.zeros, ("embed",)))(y)

        if c.layer_norm_first:
            x = x + attn(norm1(x), pos_bias, key_valid)
            return constrain(x + mlp(norm2(x)), _ACT)
        alpha = (2.0 * c.encoder_layers) ** 0.25 if c.deep_norm else 1.0
        x = norm1(x * alpha + attn(x, pos_bias, key_valid))
        return constrain(norm2(x * alpha + mlp(x)), _ACT)


class PosConv(nn.Module):
    """Weight-normed (dim=2: one g per kernel tap) grouped Conv1d + SamePad + exact GELU."""

    config: BEATsConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [b, n, d]
        c = self.config
        k, d, g = c.conv_pos, c.encoder_embed_dim, c.conv_pos_groups
        pdt = parse_dtype(c.param_dtype)
        std = math.sqrt(4.0 / (k * d))
        v = self.param("weight_v", logical_init(nn.initializers.normal(std),
                                                ("conv", None, "embed")),
                       (k, d // g, d), pdt)  # [taps, in / groups, out]
        gain = self.param("weight_g", logical_init(nn.initializers.ones, ("conv",)), (k,), pdt)
        bias = self.param("bias", logical_init(nn.initializers.zeros, ("embed",)), (d,), pdt)
        v32 = v.astype(jnp.float32)
        scale = gain.astype(jnp.float32) / jnp.sqrt(jnp.sum(v32 ** 2, axis=(1, 2)))  # [taps]
        w = (v32 * scale[:, None, None]).astype(x.dtype)
        y = jax.lax.conv_general_dilated(
            x, w, window_strides=(1,), padding=((k // 2, k // 2),),
            dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=g)
        y = y[:, : x.shape[1]] + bias.astype(x.dtype)  # even kernel: SamePad drops the last step
        return jax.nn.gelu(y, approximate=False)


class BEATsEncoder(nn.Module):
    """Waveform [batch, samples] (or fbank [batch, frames, mels]) -> ([b, tokens, d], valid).

    Tokens are ordered time-block-major, frequency-block-minor (as BEATs' flatten).
    """

    config: BEATsConfig

    def _validate(self, waveform: Any, fbank: Any, lengths: Any, padding_mask: Any) -> None:
        c = self.config
        if (waveform is None) == (fbank is None):
            raise ValueError("BEATsEncoder: pass exactly one of waveform or fbank")
        x = waveform if fbank is None else fbank
        rank, name = (2, "waveform [batch, samples]") if fbank is None else \
            (3, "fbank [batch, frames, mels]")
        shape = tuple(np.shape(x))
        if len(shape) != rank:
            raise ValueError(f"BEATsEncoder: {name} must have rank {rank}, got shape {shape}")
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise ValueError(f"BEATsEncoder: {name} must be floating point, got "
                             f"{jnp.result_type(x)}")
        if fbank is None:
            if c.num_tokens(shape[1]) == 0:
                min_samples = c.window_size + (c.patch_size - 1) * c.window_shift
                raise ValueError(f"BEATsEncoder: waveform too short: {shape[1]} samples give "
                                 f"no {c.patch_size}-frame patch (need >= {min_samples})")
        else:
            if shape[2] != c.num_mel_bins:
                raise ValueError(f"BEATsEncoder: fbank must have {c.num_mel_bins} mel bins, "
                                 f"got {shape[2]}")
            if shape[1] < c.patch_size:
                raise ValueError(f"BEATsEncoder: fbank needs >= {c.patch_size} frames, got "
                                 f"{shape[1]}")
        if lengths is not None and padding_mask is not None:
            raise ValueError("BEATsEncoder: pass lengths or padding_mask, not both")
        if lengths is not None and tuple(np.shape(lengths)) != (shape[0],):
            raise ValueError(f"BEATsEncoder: lengths must be [batch] = ({shape[0]},), got "
                             f"{tuple(np.shape(lengths))}")
        if padding_mask is not None and tuple(np.shape(padding_mask)) != shape[:2]:
            raise ValueError(f"BEATsEncoder: padding_mask must be {shape[:2]} (True = padded), "
                             f"got {tuple(np.shape(padding_mask))}")

    def _position_bias(self, n: int) -> jax.Array | None:
        """Layer 0's bucket table, looked up once: [heads, n, n] (None without rel-pos)."""
        c = self.config
        if not c.relative_position_embedding:
            return None
        table = self.param("relative_attention_bias",
                           logical_init(nn.initializers.normal(c.init_std), (None, "heads")),
                           (c.num_buckets, c.encoder_attention_heads), parse_dtype(c.param_dtype))
        buckets = jnp.asarray(relative_position_buckets(n, c.num_buckets, c.max_distance))
        rel = jnp.arange(n)[None, :] - jnp.arange(n)[:, None] + (n - 1)  # key - query, shifted
        return jnp.transpose(table[buckets[rel]], (2, 0, 1))  # [heads, n, n]

    @nn.compact
    def __call__(self, waveform: jax.Array | None = None, *, fbank: jax.Array | None = None,
                 lengths: jax.Array | None = None,
                 padding_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """lengths: valid samples (waveform) or frames (fbank) per item; padding_mask: unilm's
        [b, samples] (or [b, frames]) bool, True = padded. Returns features and a [b, tokens]
        bool mask (True = valid); padded tokens are zeroed and removed as attention keys."""
        self._validate(waveform, fbank, lengths, padding_mask)
        c = self.config
        dt, pdt = parse_dtype(c.dtype), parse_dtype(c.param_dtype)
        if fbank is None:
            fbank = beats_fbank(waveform, c)  # [b, frames, mels]
        b, frames = fbank.shape[:2]
        pad = None
        if lengths is not None:
            steps = (waveform if waveform is not None else fbank).shape[1]
            padding_mask = jnp.arange(steps)[None, :] >= jnp.asarray(lengths)[:, None]
        if padding_mask is not None:
            pad = jnp.asarray(padding_mask, bool)
            if waveform is not None:
                pad = reduce_padding_mask(pad, frames)  # samples -> frames
        usable = frames // c.patch_size * c.patch_size
        x = fbank[:, :usable, :, None].astype(dt)  # [b, time, freq, 1]
        x = nn.Conv(c.embed_dim, (c.patch_size, c.patch_size), strides=c.patch_size,
                    padding="VALID", use_bias=c.conv_bias, dtype=dt, param_dtype=pdt,
                    kernel_init=logical_init(nn.initializers.normal(c.init_std),
                                             (None, None, "conv", "embed")),
                    bias_init=logical_init(nn.initializers.zeros, ("embed",)),
                    name="patch_embedding")(x)  # [b, t', f', embed_dim]
        x = x.reshape(b, -1, c.embed_dim)  # time-major flatten: [b, t' * f', embed_dim]
        x = LayerNorm(c.layer_norm_eps, dtype=dt, param_dtype=pdt, name="layer_norm")(x)
        n = x.shape[1]
        valid = jnp.ones((b, n), bool) if pad is None else ~reduce_padding_mask(pad, n)
        if c.embed_dim != c.encoder_embed_dim:
            x = nn.Dense(c.encoder_embed_dim, dtype=dt, param_dtype=pdt,
                         kernel_init=logical_init(nn.initializers.normal(c.init_std),
                                                  (None, "embed")),
                         bias_init=logical_init(nn.initializers.zeros, ("embed",)),
                         name="post_extract_proj")(x)
        x = constrain(x * valid[..., None].astype(dt), _ACT)  # [b, n, d]
        x = x + PosConv(c, name="pos_conv")(x)
        final = LayerNorm(c.layer_norm_eps, dtype=dt, param_dtype=pdt, name="encoder_norm")
        if not c.layer_norm_first:
            x = final(x)
        pos_bias = self._position_bias(n)
        for i in range(c.encoder_layers):
            x = BEATsLayer(c, name=f"layers_{i}")(x, pos_bias, valid)
        if c.layer_norm_first:
            x = final(x)
        return x * valid[..., None].astype(x.dtype), valid
