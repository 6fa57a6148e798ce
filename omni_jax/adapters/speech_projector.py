"""Frame-stacking speech projector (Ola k=10 with begin/end/newline vectors; OpenOmni k=5).

Per chunk: [T, C] -> stack k consecutive frames -> [T/k, k*C] (frame-major: row t holds frames
t*k .. t*k+k-1 in order) -> Linear -> ReLU -> Linear(D). T not divisible by k: `remainder="pad"`
appends zero frames up to a multiple of k (ceil), `"drop"` discards the last T % k frames as the
released Ola/OpenOmni/SLAM code does (identical for Whisper's 1500 frames and k = 5 or 10).
Ola layout per item: [speech_begin] chunk_0 tokens [speech_newline] ... chunk_n [speech_newline]
[speech_end]; without vectors the chunks' tokens are simply concatenated.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_jax.adapters.mlp_projector import AdapterConfig, check_choice, check_positive
from omni_jax.layers.common import constrain, logical_init, parse_dtype
from omni_jax.layers.mlp import activation

REMAINDERS = ("pad", "drop")
VECTORS = ("speech_begin", "speech_newline", "speech_end")
# name -> settings of the released systems (widths come from the model config)
SPEECH_PRESETS = {"ola": {"stack": 10, "special_vectors": True},
                  "openomni": {"stack": 5, "special_vectors": False}}


@dataclasses.dataclass(frozen=True)
class SpeechProjectorConfig(AdapterConfig):
    """in_dim C (Ola: 1280 + 768), out_dim D (LLM width), hidden_dim (code: 2048), stack k."""

    in_dim: int = 64
    out_dim: int = 64
    hidden_dim: int = 2048
    stack: int = 10
    remainder: str = "pad"
    special_vectors: bool = True
    act: str = "relu"
    init_std: float = 0.02
    vector_std: float | None = None  # None: 1/sqrt(out_dim) (Ola's randn * 1/sqrt(D))
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_positive("SpeechProjectorConfig", in_dim=self.in_dim, out_dim=self.out_dim,
                       hidden_dim=self.hidden_dim, stack=self.stack, init_std=self.init_std)
        if self.vector_std is not None:
            check_positive("SpeechProjectorConfig", vector_std=self.vector_std)
        check_choice("SpeechProjectorConfig", "remainder", self.remainder, REMAINDERS)
        activation(self.act)
        parse_dtype(self.dtype)
        parse_dtype(self.param_dtype)

    def tokens_per_chunk(self, num_frames: int) -> int:
        """Stacked rows of one chunk of `num_frames` encoder frames."""
        if self.remainder == "pad":
            return math.ceil(num_frames / self.stack)
        return num_frames // self.stack

    def num_tokens(self, num_frames: int, num_chunks: int) -> int:
        """LLM embeddings for one item of `num_chunks` chunks of `num_frames` frames each;
        the template expands the <speech> placeholder to exactly this many positions."""
        if num_frames < 0 or num_chunks < 1:
            raise ValueError(f"SpeechProjector: need num_frames >= 0 and num_chunks >= 1, got "
                             f"{num_frames}, {num_chunks}")
        per = self.tokens_per_chunk(num_frames)
        if self.special_vectors:
            return num_chunks * (per + 1) + 2
        return num_chunks * per


def stack_frames(x: jax.Array, k: int, remainder: str) -> jax.Array:
    """[..., T, C] -> [..., T'/k, k*C]: pad T with zero frames to a multiple of k, or drop."""
    t = x.shape[-2]
    if t % k:
        if remainder == "pad":
            pad = [(0, 0)] * (x.ndim - 2) + [(0, k - t % k), (0, 0)]
            x = jnp.pad(x, pad)
        else:
            x = x[..., : t - t % k, :]
    return x.reshape(*x.shape[:-2], x.shape[-2] // k, k * x.shape[-1])


class SpeechProjector(nn.Module):
    """Encoder frames [batch, chunks, T, C] (or one item [chunks, T, C]) -> [(batch,) N, D]."""

    config: SpeechProjectorConfig

    def _validate(self, x: jax.Array) -> None:
        c = self.config
        if x.ndim not in (3, 4):
            raise ValueError(f"SpeechProjector: expected [batch, chunks, frames, {c.in_dim}] or "
                             f"[chunks, frames, {c.in_dim}], got shape {tuple(x.shape)}")
        if x.shape[-1] != c.in_dim:
            raise ValueError(f"SpeechProjector: expected {c.in_dim} input channels, got "
                             f"{x.shape[-1]}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"SpeechProjector: features must be floating point, got {x.dtype}")
        if c.tokens_per_chunk(x.shape[-2]) == 0:
            raise ValueError(f"SpeechProjector: {x.shape[-2]} frames per chunk give no token "
                             f"with stack={c.stack} and remainder='drop'")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        self._validate(x)
        c = self.config
        dt, pdt = parse_dtype(c.dtype), parse_dtype(c.param_dtype)
        single = x.ndim == 3
        if single:
            x = x[None]
        b, n = x.shape[:2]
        h = stack_frames(x.astype(dt), c.stack, c.remainder)  # [b, chunks, per, k*C]
        init = nn.initializers.normal(c.init_std)
        h = nn.Dense(c.hidden_dim, dtype=dt, param_dtype=pdt,
                     kernel_init=logical_init(init, (None, "mlp")),
                     bias_init=logical_init(nn.initializers.zeros, ("mlp",)), name="linear1")(h)
        h = activation(c.act)(h)
        h = nn.Dense(c.out_dim, dtype=dt, param_dtype=pdt,
                     kernel_init=logical_init(init, ("mlp", "embed")),
                     bias_init=logical_init(nn.initializers.zeros, ("embed",)), name="linear2")(h)
        if c.special_vectors:
            std = c.vector_std if c.vector_std is not None else c.out_dim ** -0.5
            vec = {v: self.param(v, logical_init(nn.initializers.normal(std), ("embed",)),
                                 (c.out_dim,), pdt).astype(dt) for v in VECTORS}
            nl = jnp.broadcast_to(vec["speech_newline"], (b, n, 1, c.out_dim))
            h = jnp.concatenate([h, nl], axis=2).reshape(b, -1, c.out_dim)  # chunk rows + NL
            begin = jnp.broadcast_to(vec["speech_begin"], (b, 1, c.out_dim))
            end = jnp.broadcast_to(vec["speech_end"], (b, 1, c.out_dim))
            h = jnp.concatenate([begin, h, end], axis=1)
        else:
            h = h.reshape(b, -1, c.out_dim)
        h = constrain(h, ("act_batch", "act_len", "act_embed"))
        return h[0] if single else h
