"""Device meshes over the (data, fsdp, tensor, expert) axes and multi-host initialization."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh

from omni_jax.parallel.rules import MESH_AXES

log = logging.getLogger(__name__)


def mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Complete a partial {axis: size} over MESH_AXES (missing axes = 1, one -1 = the rest).

    ValueError for an unknown axis, a non-positive size or a product != num_devices.
    """
    shape = dict(shape)
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh: unknown axes {unknown}; expected a subset of {list(MESH_AXES)}")
    full = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    free = [a for a, n in full.items() if n == -1]
    bad = {a: n for a, n in full.items() if n == 0 or n < -1}
    if bad or len(free) > 1:
        raise ValueError(f"mesh: axis sizes must be positive (at most one -1 = 'the rest'), "
                         f"got {full}")
    if free:
        rest = math.prod(n for n in full.values() if n > 0)
        if num_devices % rest:
            raise ValueError(f"mesh: shape {full} cannot fill {num_devices} devices "
                             f"({num_devices} is not divisible by {rest})")
        full[free[0]] = num_devices // rest
    total = math.prod(full.values())
    if total != num_devices:
        raise ValueError(f"mesh: shape {full} has {total} devices in total but there are "
                         f"{num_devices} devices; the product of the axis sizes must equal "
                         f"the device count")
    return full


def make_mesh(shape: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor, expert), all AxisType.Auto (GSPMD propagation).

    shape: {axis: size}; missing axes get size 1, one axis may be -1 (all remaining devices).
    devices default to jax.devices() (all processes).
    """
    devices = list(jax.devices() if devices is None else devices)
    full = mesh_shape(shape, len(devices))
    sizes = tuple(full[a] for a in MESH_AXES)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def _env(name: str) -> str | None:
    for key in (f"OMNI_{name}", f"JAX_{name}"):
        if os.environ.get(key):
            return os.environ[key]
    return None


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None,
                                 local_device_ids: Sequence[int] | None = None) -> bool:
    """Call jax.distributed.initialize when this is a multi-process run; True if it did.

    Arguments override the environment: OMNI_/JAX_COORDINATOR_ADDRESS, OMNI_/JAX_NUM_PROCESSES,
    OMNI_/JAX_PROCESS_ID. OMNI_DISTRIBUTED=auto lets JAX detect the cluster itself (SLURM,
    TPU pod, Open MPI). Single process (nothing set, or num_processes == 1): no-op. Idempotent.
    Must run before any other JAX call that touches devices.
    """
    if jax.distributed.is_initialized():
        return True
    if os.environ.get("OMNI_DISTRIBUTED", "").lower() == "auto":
        jax.distributed.initialize()
        return True
    coordinator_address = coordinator_address or _env("COORDINATOR_ADDRESS")
    if num_processes is None and _env("NUM_PROCESSES"):
        num_processes = int(_env("NUM_PROCESSES"))
    if process_id is None and _env("PROCESS_ID"):
        process_id = int(_env("PROCESS_ID"))
    if coordinator_address is None and (num_processes or 1) <= 1:
        return False
    if coordinator_address is None or num_processes is None or process_id is None:
        raise ValueError(
            f"distributed: need coordinator_address, num_processes and process_id together, got "
            f"{coordinator_address!r}, {num_processes!r}, {process_id!r}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"distributed: process_id {process_id} not in [0, {num_processes})")
    log.info("jax.distributed.initialize(%s, %d, %d)", coordinator_address, num_processes,
             process_id)
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               local_device_ids=local_device_ids)
    return True
