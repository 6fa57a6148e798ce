"""Training: stages (freezing, LR groups), losses, optimizer, trainer, checkpoints, metrics."""

from omni_jax.train.checkpoint import Checkpointer, PreemptionGuard
from omni_jax.train.losses import LOSSES, cross_entropy, make_objective, register_loss
from omni_jax.train.model import DecoderLM, TrainModel
from omni_jax.train.optim import OptimConfig, build_optimizer, make_schedule
from omni_jax.train.stages import StageConfig, label_tree, param_paths
from omni_jax.train.trainer import Trainer, default_config

__all__ = ["LOSSES", "Checkpointer", "DecoderLM", "OptimConfig", "PreemptionGuard",
           "StageConfig", "TrainModel", "Trainer", "build_optimizer", "cross_entropy",
           "default_config", "label_tree", "make_objective", "make_schedule", "param_paths",
           "register_loss"]
