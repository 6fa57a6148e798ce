"""Scale plan: per-device bytes of a stage's parameters, gradients and optimizer state on a
mesh of any size, from abstract shapes and the logical sharding rules (nothing allocated).

  python -m omni_jax.cli.train --config ola:model=qwen7b --workdir w --dry_run \\
      --config.train.plan_devices=64 --config.train.mesh.data=8 --config.train.mesh.fsdp=8

Gradients count the trainable parameters only (frozen ones get none: XLA drops their
backward); optimizer state is the stage's optax state (Adam's moments for trainable params).
Activations and XLA temporaries are not included: they depend on the compiled step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from omni_jax.parallel.mesh import mesh_shape
from omni_jax.parallel.rules import MESH_AXES
from omni_jax.parallel.sharding import dict_key_tail, fit_spec, normalize_rules

GIB = 1024 ** 3


def _shard_bytes(shape: tuple[int, ...], dtype: Any, spec: PartitionSpec,
                 mesh: AbstractMesh) -> int:
    sharded = NamedSharding(mesh, fit_spec(spec, shape, mesh)).shard_shape(shape)
    return int(math.prod(sharded)) * np.dtype(dtype).itemsize


def memory_plan(model: Any, tc: ml_collections.ConfigDict, devices: int) -> dict[str, Any]:
    """{"mesh", "params", "grads", "opt_state", "total"} per-device bytes for one stage."""
    from omni_jax.train.optim import OptimConfig, build_optimizer
    from omni_jax.train.stages import FREEZE, StageConfig, label_tree

    full = mesh_shape(dict(tc.mesh), devices)
    mesh = AbstractMesh(tuple(full[a] for a in MESH_AXES), MESH_AXES)
    rules = normalize_rules(tc.rules or None)
    batch = {"input_ids": jax.ShapeDtypeStruct((1, 8), np.int32)}
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))["params"]
    with nn.logical_axis_rules(rules):
        specs = nn.logical_to_mesh(nn.get_partition_spec(boxed))
    params = nn.unbox(boxed)
    stage = StageConfig.from_dict(tc.stage)
    labels = label_tree(params, stage)
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_s = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, PartitionSpec))
    flat_l = jax.tree.leaves(labels)
    table, p_bytes, g_bytes = {}, 0, 0
    for (path, x), spec, lab in zip(flat_p, flat_s, flat_l):
        b = _shard_bytes(x.shape, x.dtype, spec, mesh)
        table[dict_key_tail(path)] = (x.shape, spec)
        p_bytes += b
        g_bytes += b if lab != FREEZE else 0
    tx, _ = build_optimizer(OptimConfig.from_dict(tc.optim), stage, labels, int(tc.steps))
    o_bytes = 0
    for path, x in jax.tree_util.tree_flatten_with_path(jax.eval_shape(tx.init, params))[0]:
        shape, spec = table.get(dict_key_tail(path), (None, None))
        spec = spec if shape == x.shape else PartitionSpec()
        o_bytes += _shard_bytes(x.shape, x.dtype, spec, mesh)
    return {"mesh": full, "params": p_bytes, "grads": g_bytes, "opt_state": o_bytes,
            "total": p_bytes + g_bytes + o_bytes}


def format_memory(plan: Mapping[str, Any]) -> str:
    mesh = " x ".join(f"{a}={n}" for a, n in plan["mesh"].items() if n > 1) or "1 device"
    return (f"per device on {mesh}: params {plan['params'] / GIB:.2f} GiB, grads "
            f"{plan['grads'] / GIB:.2f} GiB, optimizer {plan['opt_state'] / GIB:.2f} GiB, "
            f"total {plan['total'] / GIB:.2f} GiB (+ activations)")


TOKEN_KEYS = ("input_ids", "targets", "loss_mask", "modality", "item_index", "segment_ids",
              "positions", "media_index")


def abstract_batch(plan: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch a stage's pipeline yields, as shapes (token keys + its media budget)."""
    from omni_jax.data.pipeline import DataConfig
    from omni_jax.train.audio_ctc import TRANSCRIPT_KEY, TRANSCRIPT_LOSSES

    dc = DataConfig.from_dict(plan.data)
    b, n = int(plan.trainer_config.batch_size), dc.max_len
    keys = TOKEN_KEYS + ((TRANSCRIPT_KEY,) if set(TRANSCRIPT_LOSSES) & set(dict(
        plan.trainer_config.stage.losses)) else ())
    out = {k: jax.ShapeDtypeStruct((b, n), np.int32) for k in keys}
    for key, spec in plan.data.get("media", {}).items():
        out[key] = jax.ShapeDtypeStruct((int(spec["max_items"]), *spec["shape"]), np.float32)
    return out


def compiled_memory(plan: Any) -> dict[str, int]:
    """XLA's memory analysis of the stage's compiled train step on this process's devices
    (emulate the mesh with --xla_force_host_platform_device_count): per-device bytes of
    arguments, outputs, temporaries and generated code. ValueError for speech-target stages
    (their batch layout comes from the data) or when the mesh needs other devices."""
    from omni_jax.train.trainer import Trainer

    if plan.data.get("speech"):
        raise ValueError(f"stage {plan.name!r}: compiled memory is not planned for speech-out "
                         "stages (their target arrays are sized by the data)")
    need = math.prod(mesh_shape(dict(plan.trainer_config.mesh), jax.device_count()).values())
    if need != jax.device_count():
        raise ValueError(f"compiling the plan needs the mesh's {need} devices; this process "
                         f"has {jax.device_count()} (XLA_FLAGS="
                         f"--xla_force_host_platform_device_count={need})")
    trainer = Trainer(plan.trainer_config, plan.model)
    batch = abstract_batch(plan)
    trainer._setup({k: np.zeros((1, *v.shape[1:]), v.dtype) for k, v in batch.items()})
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding)
             for k, v in batch.items()}
    fn = jax.jit(trainer._train_step,
                 in_shardings=(trainer.state_shardings, trainer.batch_sharding),
                 out_shardings=(trainer.state_shardings, trainer.replicated),
                 donate_argnums=(0,))
    with trainer._ctx():
        compiled = fn.lower(trainer.abstract_state, batch).compile()
    ma = compiled.memory_analysis()
    return {"arguments": int(ma.argument_size_in_bytes), "outputs": int(ma.output_size_in_bytes),
            "temporaries": int(ma.temp_size_in_bytes),
            "code": int(ma.generated_code_size_in_bytes)}


def format_compiled(mem: Mapping[str, int]) -> str:
    return ("compiled step per device: temporaries "
            f"{mem['temporaries'] / GIB:.3f} GiB, arguments {mem['arguments'] / GIB:.3f} GiB, "
            f"outputs {mem['outputs'] / GIB:.3f} GiB")
