"""Decoder-only language models (Qwen2 / Qwen2.5 family)."""

from omni_jax.llm.config import LLMConfig
from omni_jax.llm.decoder import Decoder

__all__ = ["Decoder", "LLMConfig"]
