"""Param-tree helpers: '/'-joined flat views and stacking of per-layer subtrees for nn.scan."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from flax import traverse_util


def flatten(tree: dict[str, Any]) -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}."""
    return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a/b/c": leaf} -> nested dict."""
    return traverse_util.unflatten_dict(flat, sep="/")


def stack_layers(params: dict[str, Any], num_layers: int, prefix: str = "layers") -> dict[str, Any]:
    """{layers_0: t, layers_1: t, ...} -> {layers: t with a leading [num_layers] axis}."""
    out = {k: v for k, v in params.items() if not re.fullmatch(rf"{prefix}_\d+", k)}
    per_layer = [flatten(params[f"{prefix}_{i}"]) for i in range(num_layers)]
    out[prefix] = unflatten({k: np.stack([np.asarray(p[k]) for p in per_layer])
                             for k in per_layer[0]})
    return out


def unstack_layers(params: dict[str, Any], num_layers: int,
                   prefix: str = "layers") -> dict[str, Any]:
    """Inverse of stack_layers."""
    out = {k: v for k, v in params.items() if k != prefix}
    flat = flatten(params[prefix])
    for i in range(num_layers):
        out[f"{prefix}_{i}"] = unflatten({k: np.asarray(v)[i] for k, v in flat.items()})
    return out
