"""Param-tree helpers: '/'-joined flat views and stacking of per-layer subtrees for nn.scan."""

from __future__ import annotations

import re
from collections.abc import Mapping
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


def export_by_rules(params: Any, rules: Any, what: str) -> dict[str, Any]:
    """Params tree -> {checkpoint key: float32 array} along converter rules
    (key, tree path, _, to_checkpoint, shape); ValueError naming a missing or misshaped one."""
    from flax.core import meta

    params = meta.unbox(params)
    out = {}
    for key, path, _, convert, shape in rules:
        node: Any = params
        for p in path:
            if not isinstance(node, Mapping) or p not in node:
                raise ValueError(f"{what} params: missing {'/'.join(path)}")
            node = node[p]
        w = convert(np.asarray(node, np.float32))
        if w.shape != shape:
            raise ValueError(f"{what} params: {'/'.join(path)} gives {key} of shape "
                             f"{w.shape}, expected {shape}")
        out[key] = w
    return out
