"""The trainer: sharded init, one jitted train step (grad accumulation, clipping, per-group LR,
frozen params), an eval step, and the loop with checkpoints, preemption and metrics.

Settings come from a ConfigDict (see `default_config`); the model is any `TrainModel`
(omni_jax.train.model) and the objective is the stage's losses from a loss registry.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from omni_jax.parallel.mesh import make_mesh
from omni_jax.parallel.sharding import (
    batch_axes,
    check_batch_divisible,
    mirror_shardings,
    normalize_rules,
    shard_batch,
    tree_shardings,
)
from omni_jax.train.checkpoint import Checkpointer, PreemptionGuard
from omni_jax.train.losses import LossFn, make_objective
from omni_jax.train.metrics import MetricsLogger, measure_peak_flops
from omni_jax.train.model import Batch, TrainModel
from omni_jax.train.optim import OptimConfig, build_optimizer
from omni_jax.train.stages import FREEZE, StageConfig, label_tree

log = logging.getLogger(__name__)
State = dict[str, Any]  # {"params", "opt_state", "step"}


def default_config() -> ml_collections.ConfigDict:
    """The trainer's settings with their defaults (recipes override per stage)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 8  # global, all processes
    c.grad_accum = 1  # micro-batches per step (lax.scan)
    c.steps = 100
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "expert": 1})
    c.rules = ()  # ((logical, mesh axes), ...); empty = omni_jax.parallel.rules.DEFAULT_RULES
    c.optim = ml_collections.ConfigDict(OptimConfig().__dict__)
    c.stage = ml_collections.ConfigDict(
        {"name": "default", "trainable": (".*",), "lr_groups": {}, "losses": {"ce": 1.0}})
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 100, "keep": 3, "async_save": True})
    c.log_every = 10
    c.eval_every = 0  # 0 = no periodic eval
    c.eval_batches = 1
    c.peak_flops = 0.0  # per device FLOP/s for MFU; 0 = measure a matmul once
    c.progress_bar = True
    c.tensorboard = True
    # a step whose loss or gradient norm is not finite leaves params and optimizer state as
    # they were (metric "skipped"); this many in a row stop the run (NonFiniteError)
    c.max_nonfinite_steps = 5
    return c


class NonFiniteError(ValueError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


def _validate(c: ml_collections.ConfigDict) -> None:
    for k in ("batch_size", "grad_accum", "steps", "log_every", "max_nonfinite_steps"):
        if int(c[k]) <= 0:
            raise ValueError(f"trainer: {k} must be positive, got {c[k]}")
    if c.batch_size % c.grad_accum:
        raise ValueError(f"trainer: batch_size={c.batch_size} is not divisible by "
                         f"grad_accum={c.grad_accum}")


def _cast_tree(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype), tree)


class Trainer:
    """Build with a ConfigDict + model (+ loss registry); `init_state`, `train_step`,
    `eval_step`, `fit` / `run` (auto-resume from a workdir)."""

    def __init__(self, config: ml_collections.ConfigDict, model: TrainModel, *,
                 losses: Mapping[str, LossFn] | None = None,
                 mesh: jax.sharding.Mesh | None = None) -> None:
        _validate(config)
        self.config = config
        self.model = model
        self.rules = normalize_rules(config.rules or None)
        self.mesh = make_mesh(dict(config.mesh)) if mesh is None else mesh
        check_batch_divisible(config.batch_size, self.mesh, self.rules)
        check_batch_divisible(config.batch_size // config.grad_accum, self.mesh, self.rules,
                              what="micro batch size (batch_size / grad_accum)")
        self.stage = StageConfig.from_dict(config.stage)
        self.optim = OptimConfig.from_dict(config.optim)
        self.objective = make_objective(self.stage.losses, losses)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh,
                                            PartitionSpec(batch_axes(self.mesh, self.rules)))
        self._train_fn = self._eval_fn = None

    # ---- state -------------------------------------------------------------------------------
    def _ctx(self):
        """Mesh + logical rules for tracing (linen's logical constraints need both)."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def _setup(self, example_batch: Batch) -> None:
        """Abstract init -> shardings, label tree, optimizer (no compute on real arrays)."""
        spec = {k: jax.ShapeDtypeStruct((1, *np.shape(v)[1:]), jnp.asarray(v).dtype)
                for k, v in example_batch.items()}
        self._init_batch = spec
        rng = jax.random.key(self.config.seed)
        # init runs outside the logical-rules context: flax's DenseGeneral reshapes its boxed
        # kernel during init, which a logical constraint would reject; out_shardings place it
        boxed = jax.eval_shape(lambda r: self.model.init(r, self._zeros())["params"], rng)
        self.param_shardings = tree_shardings(boxed, self.mesh, self.rules)
        abstract = nn.unbox(boxed)
        self.labels = label_tree(abstract, self.stage)
        self.tx, self.schedule = build_optimizer(self.optim, self.stage, self.labels,
                                                 self.config.steps)
        abstract_opt = jax.eval_shape(self.tx.init, abstract)
        opt_shardings = mirror_shardings(abstract_opt, abstract, self.param_shardings, self.mesh)
        self.state_shardings = {"params": self.param_shardings, "opt_state": opt_shardings,
                                "step": self.replicated}
        abstract_state = {"params": abstract, "opt_state": abstract_opt,
                          "step": jax.ShapeDtypeStruct((), jnp.int32)}
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state, self.state_shardings)

    def _zeros(self) -> dict[str, jax.Array]:
        return {k: jnp.zeros(v.shape, v.dtype) for k, v in self._init_batch.items()}

    def init_state(self, example_batch: Batch, params: Any = None,
                   parts: Mapping[str, Any] | None = None) -> State:
        """Sharded initial state. example_batch: arrays/ShapeDtypeStructs of one batch (shapes
        only). params: start from these (e.g. the previous stage's) instead of a fresh init.
        parts: {top-level param key: subtree} replacing those parts of a fresh init (pretrained
        weights, placed straight into their shardings)."""
        self._setup(example_batch)
        parts = dict(parts or {})
        if params is not None and parts:
            raise ValueError("init_state: pass params or parts, not both")

        def init(rng, given, parts):
            p = given if given is not None else {
                **nn.unbox(self.model.init(rng, self._zeros())["params"]), **parts}
            return {"params": p, "opt_state": self.tx.init(p), "step": jnp.zeros((), jnp.int32)}

        if params is not None:
            params = jax.device_put(params, self.param_shardings)
        part_shardings = {k: self.param_shardings[k] for k in parts}
        parts = jax.device_put(parts, part_shardings)
        fn = jax.jit(init, in_shardings=(self.replicated, None if params is None else
                                         self.param_shardings, part_shardings),
                     out_shardings=self.state_shardings)
        with jax.set_mesh(self.mesh):
            return fn(jax.random.key(self.config.seed), params, parts)

    # ---- steps -------------------------------------------------------------------------------
    def _grads(self, params: Any, batch: Batch) -> tuple[Any, dict[str, jax.Array]]:
        """Gradients (token-weighted mean over micro-batches) and the objective's metrics."""
        def loss_fn(p, b):
            return self.objective(self.model.apply(p, b, train=True), b)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        m = self.config.grad_accum
        if m == 1:
            (_, metrics), grads = grad_fn(params, batch)
            return grads, metrics
        axes = batch_axes(self.mesh, self.rules)
        # micro-batch i = rows i, i+m, ...: each device keeps its rows (no data movement)
        micro = {k: jax.lax.with_sharding_constraint(
            jnp.swapaxes(v.reshape(v.shape[0] // m, m, *v.shape[1:]), 0, 1),
            NamedSharding(self.mesh, PartitionSpec(None, axes))) for k, v in batch.items()}
        if "loss_mask" in micro:
            counts = jnp.sum(micro["loss_mask"].reshape(m, -1).astype(jnp.float32), axis=1)
            weights = counts / jnp.maximum(jnp.sum(counts), 1.0)
        else:
            weights = jnp.full((m,), 1.0 / m)

        def body(acc, xs):
            mb, w = xs
            (_, metrics), g = grad_fn(params, mb)
            g = _cast_tree(g, jnp.float32)
            step = (jax.tree.map(lambda x: x * w, g),
                    jax.tree.map(lambda x: x.astype(jnp.float32) * w, metrics))
            return jax.tree.map(jnp.add, acc, step), None

        zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), jax.eval_shape(
            lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro))[0][1]))
        (grads, metrics), _ = jax.lax.scan(body, (zeros_g, zeros_m), (micro, weights))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        return grads, metrics

    def _train_step(self, state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        params = state["params"]
        grads, metrics = self._grads(params, batch)
        # frozen grads -> 0 before clipping; XLA drops their backward computation entirely
        grads = jax.tree.map(lambda g, lab: jnp.zeros_like(g) if lab == FREEZE else g,
                             grads, self.labels)
        updates, opt_state = self.tx.update(grads, state["opt_state"], params)
        grad_norm = optax.global_norm(grads)
        # numerical guard: a non-finite loss or gradient never reaches params / moments
        ok = jnp.isfinite(metrics["loss/total"]) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        new = {"params": keep(optax.apply_updates(params, updates), params),
               "opt_state": keep(opt_state, state["opt_state"]), "step": state["step"] + 1}
        metrics = dict(metrics, grad_norm=grad_norm, lr=self.schedule(state["step"]),
                       skipped=1.0 - ok.astype(jnp.float32))
        if "loss_mask" in batch:
            metrics["tokens/loss"] = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        return new, metrics

    def train_step(self, state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        """One optimizer step on a global batch (sharded arrays); `state` is donated."""
        if self._train_fn is None:
            self._train_fn = jax.jit(
                self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
                out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
        with self._ctx():
            return self._train_fn(state, batch)

    def eval_step(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
        """The objective's metrics on one batch, no update."""
        if self._eval_fn is None:
            def ev(p, b):
                return self.objective(self.model.apply(p, b, train=False), b)[1]
            self._eval_fn = jax.jit(ev, in_shardings=(self.param_shardings, self.batch_sharding),
                                    out_shardings=self.replicated)
        with self._ctx():
            return self._eval_fn(params, batch)

    def shard(self, local_batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """This process's rows of the global batch (numpy) -> global sharded arrays."""
        return shard_batch(dict(local_batch), self.mesh, self.rules)

    # ---- loop --------------------------------------------------------------------------------
    def checkpointer(self, workdir: str) -> Checkpointer:
        c = self.config.checkpoint
        return Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=c.every_steps,
                            keep=c.keep, async_save=c.async_save)

    def restore_or_init(self, example_batch: Batch, checkpointer: Checkpointer | None,
                        data_iter: Any = None, params: Any = None,
                        parts: Any = None, calibrate: Any = None) -> State:
        """Latest checkpoint in the workdir (state + data position), else a fresh state.
        parts: a callable abstract_params -> init_state's parts, called only for a fresh init.
        calibrate: a callable params -> params (data-calibrated statistics of frozen params,
        e.g. XVilaLM.calibrate), applied to a fresh state only (a checkpoint holds them)."""
        if checkpointer is not None and checkpointer.latest_step() is not None:
            self._setup(example_batch)
            step = checkpointer.latest_step()
            log.info("resuming from step %d in %s", step, checkpointer.directory)
            return checkpointer.restore(step, self.abstract_state, data_iter=data_iter)
        if parts is not None:
            self._setup(example_batch)
            parts = parts(self.abstract_state["params"])
        state = self.init_state(example_batch, params, parts)
        if calibrate is not None:
            with jax.set_mesh(self.mesh):
                fixed = calibrate(state["params"])
            state = {**state, "params": jax.device_put(fixed, self.param_shardings)}
        return state

    def fit(self, state: State, train_iter: Iterator[Mapping[str, Any]], *,
            checkpointer: Checkpointer | None = None, logdir: str | None = None,
            eval_iter_fn: Any = None, hooks: Sequence[Any] = ()) -> State:
        """Train until config.steps (or a SIGTERM/SIGINT: finish the step, save, return).

        train_iter yields this process's rows of each global batch (numpy dicts); it is
        checkpointed with the state if it has get_state/set_state. eval_iter_fn() -> iterator.
        hooks: callables hook(step, state, metrics) run after each step (and its save).
        """
        c = self.config
        start = int(jax.device_get(state["step"]))
        seq = int(self._init_batch["input_ids"].shape[1])
        peak = (c.peak_flops or measure_peak_flops()) * jax.device_count()
        logger = MetricsLogger(logdir if c.tensorboard else None, c.steps, start,
                               self.model.flops_per_token(seq), peak, c.progress_bar)
        data_iter = train_iter if hasattr(train_iter, "get_state") else None
        step, bad, pending = start, 0, None
        with PreemptionGuard() as guard:
            while step < c.steps:
                state, metrics = self.train_step(state, self.shard(next(train_iter)))
                step += 1
                # the previous step's guard flag (reading this step's would stall dispatch)
                for flag in ([pending] if pending is not None else []) + (
                        [metrics["skipped"]] if step == c.steps else []):
                    bad = bad + 1 if float(flag) > 0 else 0
                    if bad:
                        log.warning("step with a non-finite loss or gradient norm skipped "
                                    "(%d in a row)", bad)
                    if bad >= c.max_nonfinite_steps:
                        if checkpointer is not None:
                            checkpointer.wait()
                        raise NonFiniteError(
                            f"{bad} consecutive steps had a non-finite loss or gradient norm "
                            f"(last at step ~{step}); parameters were left unchanged by them and "
                            f"the last checkpoint is intact; lower the learning rate or check "
                            f"the data")
                pending = metrics["skipped"]
                if step == start + 1:  # keep compilation out of the throughput numbers
                    jax.block_until_ready(metrics)
                    logger.restart()
                else:
                    logger.count(c.batch_size * seq)
                if step % c.log_every == 0 or step == c.steps:
                    logger.log(step, metrics)
                if eval_iter_fn is not None and c.eval_every and step % c.eval_every == 0:
                    self.evaluate(state["params"], eval_iter_fn(), logger, step)
                stop = guard.should_stop()
                if checkpointer is not None:
                    checkpointer.save(step, state, data_iter=data_iter, config=c,
                                      force=stop or step == c.steps)
                for hook in hooks:
                    hook(step, state, metrics)
                if stop:
                    log.warning("stopping at step %d on a signal", step)
                    break
        if checkpointer is not None:
            checkpointer.wait()
        logger.close()
        self.history = logger.history
        return state

    def evaluate(self, params: Any, it: Iterator[Mapping[str, Any]],
                 logger: MetricsLogger | None = None, step: int = 0) -> dict[str, float]:
        """Mean of eval metrics over config.eval_batches batches."""
        sums: dict[str, float] = {}
        n = 0
        for _ in range(self.config.eval_batches):
            try:
                batch = next(it)
            except StopIteration:
                break
            out = jax.device_get(self.eval_step(params, self.shard(batch)))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        means = {k: v / max(n, 1) for k, v in sums.items()}
        if logger is not None:
            logger.log(step, means, prefix="eval")
        return means

    def run(self, train_iter: Iterator[Mapping[str, Any]], example_batch: Batch,
            workdir: str | None = None, *, params: Any = None, eval_iter_fn: Any = None,
            parts: Any = None, calibrate: Any = None) -> State:
        """restore_or_init from workdir/checkpoints (data position too), then fit."""
        ckpt = self.checkpointer(workdir) if workdir else None
        data_iter = train_iter if hasattr(train_iter, "get_state") else None
        state = self.restore_or_init(example_batch, ckpt, data_iter, params, parts, calibrate)
        try:
            return self.fit(state, train_iter, checkpointer=ckpt, eval_iter_fn=eval_iter_fn,
                            logdir=os.path.join(workdir, "tb") if workdir else None)
        finally:
            if ckpt is not None:
                ckpt.close()
