"""Dtype parsing and logical-partitioning helpers shared by all modules."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(name: str | jnp.dtype) -> jnp.dtype:
    """'float32' | 'bfloat16' | 'float16' (or a dtype) -> jnp dtype; ValueError otherwise."""
    if not isinstance(name, str):
        return jnp.dtype(name)
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


class _LogicallyPartitioned(nn.LogicallyPartitioned):
    """LogicallyPartitioned that skips the constraint while the value's rank differs from its
    names: flax's DenseGeneral unboxes its flat 2-D kernel before reshaping it, which fails
    under a mesh + logical rules (e.g. in apply's shape check inside a sharded train step)."""

    def unbox(self, apply_constraint: bool = True):
        if jax.numpy.ndim(self.value) != len(self.names):
            apply_constraint = False
        return super().unbox(apply_constraint)


def logical_init(init: jax.nn.initializers.Initializer, names: Sequence[str | None]):
    """Wrap an initializer so the created param carries logical axis names."""
    names = tuple(names)

    def wrapped(*args, **kwargs):
        return _LogicallyPartitioned(init(*args, **kwargs), names)

    return wrapped


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Logical sharding constraint on an activation (no-op outside a mesh/rules context)."""
    return nn.with_logical_constraint(x, tuple(names))
