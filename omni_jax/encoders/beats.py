"""BEATs-style audio encoder: Kaldi log fbank -> 16x16 patches -> conv-pos + transformer.

Structure follows microsoft/unilm BEATs (as used by Ola's dual audio encoder): waveform * 2^15
-> `torchaudio.compliance.kaldi.fbank` defaults (povey window, preemphasis 0.97, DC removal,
dither 0, power spectrum, 128 Kaldi mel bins, log with float32-eps floor) -> (fbank - mean) /
(2 std) -> Conv2d patch embed (no bias) over (time, freq) -> LayerNorm -> optional projection ->
grouped-conv positional embedding + GELU -> post-LN (deep-norm) transformer layers.
Differences from BEATs (documented): no gated relative position bias; the padding mask marks
a token padded iff all 16 frames of its time block are padded (BEATs' own mask reshapes the
sample mask without regard to the patch layout).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.config_base import StrictConfig, check_positive
from omni_jax.layers.attention import Attention
from omni_jax.layers.common import constrain, logical_init, parse_dtype
from omni_jax.layers.mlp import GeluMLP, activation
from omni_jax.layers.norms import LayerNorm

_ACT = ("act_batch", "act_len", "act_embed")
_F32_EPS = float(np.finfo(np.float32).eps)  # torchaudio's log floor (torch.finfo(float).eps)


@dataclasses.dataclass(frozen=True)
class BEATsConfig(StrictConfig):
    """BEATs feature + encoder hyper-parameters (defaults: BEATs_iter3 feature settings)."""

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
    patch_size: int = 16
    embed_dim: int = 64  # patch embedding width (BEATs: 512)
    encoder_embed_dim: int = 64  # transformer width (BEATs: 768)
    encoder_layers: int = 2
    encoder_attention_heads: int = 4
    encoder_ffn_embed_dim: int = 128
    activation_fn: str = "gelu"
    layer_norm_first: bool = False  # BEATs: post-LN
    deep_norm: bool = True  # residual * (2 * layers) ** 0.25 in post-LN layers
    conv_pos: int = 16  # positional conv kernel (BEATs: 128)
    conv_pos_groups: int = 4  # (BEATs: 16)
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
                       conv_pos_groups=self.conv_pos_groups, layer_norm_eps=self.layer_norm_eps,
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
        if not 0.0 <= self.preemphasis < 1.0:
            raise ValueError(f"BEATsConfig.preemphasis must be in [0, 1), got {self.preemphasis}")
        if self.window_size < 2 or self.window_shift < 1:
            raise ValueError("BEATsConfig: frame_length_ms / frame_shift_ms give an empty window")
        nyq = self.sample_rate / 2
        hi = self.high_freq if self.high_freq > 0 else nyq + self.high_freq
        if not 0.0 <= self.low_freq < hi <= nyq:
            raise ValueError(f"BEATsConfig: need 0 <= low_freq < high_freq <= Nyquist ({nyq}), "
                             f"got low_freq={self.low_freq}, high_freq={hi}")
        activation(self.activation_fn)
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
        t = self.num_frames(num_samples) // self.patch_size
        return t * (self.num_mel_bins // self.patch_size)


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
    """BEATs input features: normalized Kaldi fbank of waveform * scale -> [b, frames, mels]."""
    fb = kaldi_fbank(waveform * c.waveform_scale, c)
    return (fb - c.fbank_mean) / (2.0 * c.fbank_std)


def token_mask(c: BEATsConfig, lengths: jax.Array, num_samples: int) -> jax.Array:
    """[batch] valid sample counts -> [batch, tokens] bool; a token is valid iff every frame
    of its 16-frame time block lies inside the valid samples (frame-exact, see module doc)."""
    lengths = jnp.asarray(lengths)
    valid_frames = jnp.where(lengths >= c.window_size,
                             1 + (lengths - c.window_size) // c.window_shift, 0)
    t = c.num_frames(num_samples) // c.patch_size
    blocks = (jnp.arange(t)[None, :] + 1) * c.patch_size <= valid_frames[:, None]  # [b, t]
    return jnp.repeat(blocks, c.num_mel_bins // c.patch_size, axis=1)


class BEATsLayer(nn.Module):
    """Post-LN (deep-norm) or pre-LN transformer layer with biased attention and GELU FFN."""

    config: BEATsConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:  # [b, n, d]
        c = self.config
        dt, pdt = parse_dtype(c.dtype), parse_dtype(c.param_dtype)
        attn = Attention(c.encoder_attention_heads, c.encoder_attention_heads, c.head_dim,
                         q_bias=True, k_bias=True, v_bias=True, o_bias=True,
                         init_std=c.init_std, dtype=dt, param_dtype=pdt, name="attn")
        mlp = GeluMLP(c.encoder_ffn_embed_dim, c.activation_fn, c.init_std, dt, pdt, name="mlp")
        norm1 = LayerNorm(c.layer_norm_eps, dtype=dt, param_dtype=pdt, name="attn_norm")
        norm2 = LayerNorm(c.layer_norm_eps, dtype=dt, param_dtype=pdt, name="mlp_norm")
        if c.layer_norm_first:
            x = x + attn(norm1(x), mask)[0]
            return constrain(x + mlp(norm2(x)), _ACT)
        alpha = (2.0 * c.encoder_layers) ** 0.25 if c.deep_norm else 1.0
        x = norm1(x * alpha + attn(x, mask)[0])
        return constrain(norm2(x * alpha + mlp(x)), _ACT)


class BEATsEncoder(nn.Module):
    """Waveform [batch, samples] (or fbank [batch, frames, mels]) -> ([b, tokens, d], valid).

    Tokens are ordered time-block-major, frequency-block-minor (as BEATs' flatten).
    """

    config: BEATsConfig

    def _validate(self, waveform: Any, fbank: Any, lengths: Any) -> None:
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
        if lengths is not None and tuple(np.shape(lengths)) != (shape[0],):
            raise ValueError(f"BEATsEncoder: lengths must be [batch] = ({shape[0]},), got "
                             f"{tuple(np.shape(lengths))}")

    @nn.compact
    def __call__(self, waveform: jax.Array | None = None, *, fbank: jax.Array | None = None,
                 lengths: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """lengths: valid samples (waveform) or valid frames (fbank) per item; padded tokens
        are zeroed, removed as attention keys and reported False in the returned mask."""
        self._validate(waveform, fbank, lengths)
        c = self.config
        dt, pdt = parse_dtype(c.dtype), parse_dtype(c.param_dtype)
        if fbank is None:
            num_samples = waveform.shape[1]
            fbank = beats_fbank(waveform, c)  # [b, frames, mels]
            if lengths is not None:
                valid = token_mask(c, lengths, num_samples)
        elif lengths is not None:  # frames given directly: map through an equivalent count
            ws, sh = c.window_size, c.window_shift
            samples = ws + (fbank.shape[1] - 1) * sh
            valid = token_mask(c, jnp.where(lengths > 0, ws + (lengths - 1) * sh, 0), samples)
        b, frames = fbank.shape[:2]
        usable = frames // c.patch_size * c.patch_size
        x = fbank[:, :usable, :, None].astype(dt)  # [b, time, freq, 1]
        x = nn.Conv(c.embed_dim, (c.patch_size, c.patch_size), strides=c.patch_size,
                    padding="VALID", use_bias=False, dtype=dt, param_dtype=pdt,
                    kernel_init=logical_init(nn.initializers.normal(c.init_std),
                                             (None, None, "conv", "embed")),
                    name="patch_embedding")(x)  # [b, t', f', embed_dim]
        x = x.reshape(b, -1, c.embed_dim)  # time-major flatten: [b, t' * f', embed_dim]
        x = LayerNorm(c.layer_norm_eps, dtype=dt, param_dtype=pdt, name="layer_norm")(x)
        if c.embed_dim != c.encoder_embed_dim:
            x = nn.Dense(c.encoder_embed_dim, dtype=dt, param_dtype=pdt,
                         kernel_init=logical_init(nn.initializers.normal(c.init_std),
                                                  (None, "embed")),
                         bias_init=logical_init(nn.initializers.zeros, ("embed",)),
                         name="post_extract_proj")(x)
        if lengths is None:
            valid = jnp.ones(x.shape[:2], bool)
        x = constrain(x * valid[..., None].astype(dt), _ACT)
        k = c.conv_pos
        pos = nn.Conv(c.encoder_embed_dim, (k,), padding=((k // 2, k // 2),),
                      feature_group_count=c.conv_pos_groups, dtype=dt, param_dtype=pdt,
                      kernel_init=logical_init(
                          nn.initializers.normal(math.sqrt(4.0 / (k * c.encoder_embed_dim))),
                          ("conv", None, "embed")),
                      bias_init=logical_init(nn.initializers.zeros, ("embed",)),
                      name="pos_conv")(x)
        pos = pos[:, : x.shape[1]]  # even kernel: drop the extra step (BEATs' SamePad)
        x = x + jax.nn.gelu(pos, approximate=False)
        final = LayerNorm(c.layer_norm_eps, dtype=dt, param_dtype=pdt, name="encoder_norm")
        if not c.layer_norm_first:
            x = final(x)
        mask = valid[:, None, None, :]  # keys only
        for i in range(c.encoder_layers):
            x = BEATsLayer(c, name=f"layers_{i}")(x, mask)
        if c.layer_norm_first:
            x = final(x)
        return x * valid[..., None].astype(x.dtype), valid
