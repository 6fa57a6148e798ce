"""A training stage: which parameters train (path regexes), their LR groups, and the losses.

Freezing is an optimizer concern: the label tree maps each parameter path ("layers_0/attn/q/
kernel") to "freeze", "train" or a named LR group; `optax.multi_transform` gives frozen params
`optax.set_to_zero()`, so they hold no optimizer state. Patterns use `re.search` semantics
(anchor with ^...$ for exact paths).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from omni_jax.config_base import StrictConfig

FREEZE, TRAIN = "freeze", "train"


@dataclasses.dataclass(frozen=True)
class LRGroup:
    """Trainable params matching `pattern` get lr * lr_scale."""

    pattern: str
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        re.compile(self.pattern)
        if self.lr_scale < 0:
            raise ValueError(f"LRGroup: lr_scale must be >= 0, got {self.lr_scale}")


@dataclasses.dataclass(frozen=True)
class StageConfig(StrictConfig):
    """Stage settings: trainable regexes, named LR groups and {loss name: weight | options}."""

    name: str = "default"
    trainable: tuple[str, ...] = (".*",)
    lr_groups: Mapping[str, LRGroup] = dataclasses.field(default_factory=dict)
    losses: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"ce": 1.0})

    def __post_init__(self) -> None:
        if isinstance(self.trainable, str):
            object.__setattr__(self, "trainable", (self.trainable,))
        object.__setattr__(self, "trainable", tuple(self.trainable))
        for p in self.trainable:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"stage {self.name!r}: bad trainable pattern {p!r}: {e}") from e
        groups = {}
        for g, spec in dict(self.lr_groups).items():
            if g in (FREEZE, TRAIN):
                raise ValueError(f"stage {self.name!r}: LR group name {g!r} is reserved")
            groups[g] = spec if isinstance(spec, LRGroup) else LRGroup(**dict(spec))
        object.__setattr__(self, "lr_groups", groups)
        object.__setattr__(self, "losses", {k: (v if isinstance(v, int | float) else dict(v))
                                            for k, v in dict(self.losses).items()})


def path_str(path: tuple[Any, ...]) -> str:
    """A jax key path -> 'layers_0/attn/q/kernel'."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def param_paths(params: Any) -> Any:
    """Tree of the same structure whose leaves are the '/'-joined parameter paths."""
    return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p), params)


def label_tree(params: Any, stage: StageConfig) -> Any:
    """Param tree -> tree of labels: FREEZE, TRAIN or an LR group name (first match wins).

    ValueError naming any trainable pattern or LR-group pattern that matches no parameter.
    """
    paths = jax.tree.leaves(param_paths(params))
    for p in stage.trainable:
        if not any(re.search(p, s) for s in paths):
            raise ValueError(f"stage {stage.name!r}: trainable pattern {p!r} matches no parameter"
                             f" (e.g. {paths[:3]})")
    for g, spec in stage.lr_groups.items():
        if not any(re.search(spec.pattern, s) for s in paths):
            raise ValueError(f"stage {stage.name!r}: LR group {g!r} pattern {spec.pattern!r} "
                             f"matches no parameter (e.g. {paths[:3]})")

    def label(s: str) -> str:
        if not any(re.search(p, s) for p in stage.trainable):
            return FREEZE
        for g, spec in stage.lr_groups.items():
            if re.search(spec.pattern, s):
                return g
        return TRAIN

    return jax.tree.map(label, param_paths(params))


def multi_transform(labels: Any, stage: StageConfig,
                    make_tx: Callable[[float], optax.GradientTransformation]
                    ) -> optax.GradientTransformation:
    """Per-label transforms: make_tx(lr_scale) for TRAIN (scale 1) and each group, zero for FREEZE.

    Only labels present in the tree get a transform, so unused groups allocate nothing.
    """
    present = set(jax.tree.leaves(labels))
    transforms: dict[str, optax.GradientTransformation] = {FREEZE: optax.set_to_zero()}
    if TRAIN in present:
        transforms[TRAIN] = make_tx(1.0)
    for g, spec in stage.lr_groups.items():
        if g in present:
            transforms[g] = make_tx(spec.lr_scale)
    return optax.multi_transform(transforms, labels)


def trainable_mask(labels: Any) -> Any:
    """Label tree -> bool tree (True = trainable)."""
    return jax.tree.map(lambda lab: lab != FREEZE, labels)
