"""7B omni model: Qwen2.5-7B LLM with SigLIP-so400m and Whisper-large-v3 towers (the size all
five systems train). `get_config(flavor)`: flavor picks one system's adapters."""

from ml_collections import ConfigDict

from omni_jax.configs import common
from omni_jax.configs.models import qwen05b  # same towers

WIDTH = 3584
LLM = dict(vocab_size=152064, hidden_size=WIDTH, intermediate_size=18944, num_layers=28,
           num_heads=28, num_kv_heads=4, rope_theta=1e6, rms_norm_eps=1e-6,
           max_position_embeddings=32768, tie_word_embeddings=False, scan_layers=True,
           remat_policy="dots", dtype="bfloat16", param_dtype="float32")


def get_config(flavor: str | None = None) -> ConfigDict:
    return ConfigDict({"llm": LLM, **common.towers(
        flavor or "mlp", WIDTH, siglip=qwen05b.SIGLIP, whisper=qwen05b.WHISPER,
        sizes=qwen05b.SIZES, beats=qwen05b.BEATS)})
