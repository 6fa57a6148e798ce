"""Learning-rate schedules and the optimizer of a stage (clip by global norm -> per-group AdamW)."""

from __future__ import annotations

import dataclasses
from typing import Any

import optax

from omni_jax.config_base import StrictConfig
from omni_jax.train.stages import StageConfig, multi_transform

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig(StrictConfig):
    """AdamW + warmup/decay schedule + global-norm clipping (clip_norm <= 0 disables)."""

    lr: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 0
    end_lr_ratio: float = 0.0  # final lr = lr * end_lr_ratio
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OptimConfig: unknown schedule {self.schedule!r}; expected one of "
                             f"{SCHEDULES}")
        if self.lr < 0 or self.warmup_steps < 0 or not 0 <= self.end_lr_ratio <= 1:
            raise ValueError(f"OptimConfig: need lr >= 0, warmup_steps >= 0, 0 <= end_lr_ratio "
                             f"<= 1, got {self.lr}, {self.warmup_steps}, {self.end_lr_ratio}")


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> lr over warmup_steps, then cosine/linear decay to lr*end_lr_ratio."""
    end = cfg.lr * cfg.end_lr_ratio
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if not cfg.warmup_steps:
        return decay
    warm = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warm, decay], [cfg.warmup_steps])


def build_optimizer(cfg: OptimConfig, stage: StageConfig, labels: Any,
                    total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """clip_by_global_norm -> multi_transform(AdamW at lr*scale per group, zero for frozen).

    Frozen gradients must be zeroed before this (the trainer does), so clipping sees only the
    trainable ones.
    """
    schedule = make_schedule(cfg, total_steps)

    def adamw(scale: float) -> optax.GradientTransformation:
        lr = schedule if scale == 1.0 else (lambda s: schedule(s) * scale)
        return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)

    tx = multi_transform(labels, stage, adamw)
    if cfg.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return tx, schedule
