"""The logical axis names used by omni_jax modules and the default logical -> mesh rules.

Parameters: vocab, embed, heads, kv_heads, head_dim, mlp, norm, layers, expert, conv, pos.
Activations: act_batch, act_len, act_embed, act_heads, act_mlp, act_vocab, act_expert.
Mesh axes: data, fsdp, tensor, expert.
"""

from __future__ import annotations

MESH_AXES = ("data", "fsdp", "tensor", "expert")

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("act_batch", ("data", "fsdp", "expert")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_expert", "expert"),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("conv", None),
    ("pos", None),
)
