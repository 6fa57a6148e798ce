"""Logical axis rules -> NamedShardings for parameter trees, optimizer state and batches.

Mesh axes that do not divide a dimension are dropped from that dimension's spec (the dimension
is then replicated over them). This keeps tiny test configs (e.g. 2 kv heads on tensor=4)
runnable on any mesh; real configs should pick widths divisible by their mesh axes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from omni_jax.parallel.rules import DEFAULT_RULES

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def normalize_rules(rules: Iterable[Sequence[Any]] | None) -> Rules:
    """Config rules (lists from a ConfigDict / JSON, or None = DEFAULT_RULES) -> tuple pairs."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for pair in rules:
        if len(pair) != 2:
            raise ValueError(f"sharding rule must be (logical_name, mesh_axes), got {pair!r}")
        name, axes = pair
        if isinstance(axes, list | tuple):
            axes = tuple(axes)
        out.append((str(name), axes))
    return tuple(out)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes (from the right of each entry) until each dimension divides evenly."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    fitted = []
    for dim, entry in zip(shape, entries):
        axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        fitted.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return PartitionSpec(*fitted)


def tree_shardings(boxed_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """Boxed (logically partitioned) arrays or ShapeDtypeStructs -> NamedSharding tree.

    Unboxed leaves (no logical names) are replicated.
    """
    specs = nn.get_partition_spec(boxed_tree)
    shapes = nn.unbox(boxed_tree)
    with nn.logical_axis_rules(rules):
        mesh_specs = nn.logical_to_mesh(specs)
    return jax.tree.map(lambda s, x: NamedSharding(mesh, fit_spec(s, np.shape(x), mesh)),
                        mesh_specs, shapes, is_leaf=lambda s: isinstance(s, PartitionSpec))


def batch_axes(mesh: Mesh, rules: Rules) -> tuple[str, ...]:
    """Mesh axes the batch dimension is split over: the 'act_batch' rule restricted to the mesh."""
    axes = dict(rules).get("act_batch")
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return tuple(a for a in axes if a in mesh.shape)


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
    """[batch, ...] arrays split over the data-parallel axes, other dims replicated."""
    axes = batch_axes(mesh, rules)
    return NamedSharding(mesh, PartitionSpec(axes or None, *([None] * (ndim - 1))))


def check_batch_divisible(batch_size: int, mesh: Mesh, rules: Rules,
                          what: str = "batch_size") -> None:
    """ValueError unless the global batch splits evenly over data parallelism."""
    dp = data_parallel_size(mesh, rules)
    if batch_size <= 0 or batch_size % dp:
        raise ValueError(f"{what}={batch_size} is not divisible by the data parallelism {dp} "
                         f"(mesh axes {batch_axes(mesh, rules)} of {dict(mesh.shape)})")


def shard_batch(batch: dict[str, Any], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
    """Process-local numpy batch (this process's rows) -> global arrays sharded over the batch.

    Every process passes its own slice of the global batch, in process order.
    """
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v)
    return out


def dict_key_tail(path: tuple[Any, ...]) -> tuple[str, ...]:
    """The trailing run of dict keys of a pytree path (what optimizer state shares with params)."""
    tail = []
    for k in reversed(path):
        if not isinstance(k, jax.tree_util.DictKey):
            break
        tail.append(str(k.key))
    return tuple(reversed(tail))


def mirror_shardings(abstract_tree: Any, params: Any, param_shardings: Any,
                     mesh: Mesh) -> Any:
    """Shardings for a tree that mirrors params in places (e.g. optimizer state: Adam's mu/nu).

    A leaf whose trailing dict-key path equals a parameter path with the same shape gets that
    parameter's sharding; every other leaf (step counters, ...) is replicated.
    """
    keys = dict_key_tail
    table = {keys(p): (np.shape(x), s) for (p, x), s in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_shardings))}
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, x):
        shape, sharding = table.get(keys(path), (None, None))
        return sharding if shape == np.shape(x) else replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_tree)
