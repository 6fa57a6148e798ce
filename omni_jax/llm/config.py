"""LLMConfig: the decoder's own small config, validated on construction."""

from __future__ import annotations

import dataclasses

from omni_jax.config_base import StrictConfig, check_positive
from omni_jax.layers.common import parse_dtype

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attn_out")


@dataclasses.dataclass(frozen=True)
class LLMConfig(StrictConfig):
    """Qwen2/2.5-style decoder hyper-parameters (names follow transformers' Qwen2Config)."""

    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # default hidden_size // num_heads
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = True
    initializer_range: float = 0.02
    scan_layers: bool = False
    remat_policy: str = "none"
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_positive("LLMConfig", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                       intermediate_size=self.intermediate_size, num_layers=self.num_layers,
                       num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                       rope_theta=self.rope_theta, rms_norm_eps=self.rms_norm_eps,
                       max_position_embeddings=self.max_position_embeddings)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"LLMConfig: hidden_size={self.hidden_size} is not divisible by "
                    f"num_heads={self.num_heads}; set head_dim explicitly or change the widths")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"LLMConfig: head_dim must be a positive even number (RoPE), "
                             f"got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LLMConfig: num_kv_heads={self.num_kv_heads} must divide "
                f"num_heads={self.num_heads} (grouped-query attention)")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"LLMConfig: unknown remat_policy {self.remat_policy!r}; "
                             f"expected one of {REMAT_POLICIES}")
        parse_dtype(self.dtype)
        parse_dtype(self.param_dtype)

    def num_params(self) -> int:
        """Parameter count (embeddings included once when tied)."""
        d, h, kv, hd = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        if self.qkv_bias:
            attn += h * hd + 2 * kv * hd
        layer = attn + 3 * d * self.intermediate_size + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + d

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (2 * matmul MACs, attention scores included, causal halved)."""
        d, h, kv, hd = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        mm = d * h * hd * 2 + 2 * d * kv * hd + 3 * d * self.intermediate_size
        attn = 2 * h * hd * seq_len / 2  # QK^T and PV, causal
        return 2.0 * (self.num_layers * (mm + attn) + d * self.vocab_size)
