"""One process of a multi-process train step on CPU (jax.distributed over 127.0.0.1).

python mp_script.py OUT_JSON [--coordinator HOST:PORT --nproc N --pid I]
Each process feeds its own rows of the global batch (make_array_from_process_local_data);
process 0 writes the step losses and a params checksum to OUT_JSON.
"""

import argparse
import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from omni_jax.parallel.mesh import maybe_initialize_distributed  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--coordinator", default=None)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--pid", type=int, default=0)
    a = ap.parse_args()
    if a.coordinator:
        os.environ.update(OMNI_COORDINATOR_ADDRESS=a.coordinator, OMNI_NUM_PROCESSES=str(a.nproc),
                          OMNI_PROCESS_ID=str(a.pid))
    distributed = maybe_initialize_distributed()
    jax.config.update("jax_default_matmul_precision", "highest")
    from helpers import example_batch, parity_config, synthetic_dataset, tiny_model

    from omni_jax.train import Trainer
    assert jax.process_count() == a.nproc and jax.process_index() == a.pid
    tr = Trainer(parity_config(mesh={"data": -1}), tiny_model())
    ds = synthetic_dataset(8, process_index=a.pid, process_count=a.nproc)
    state = tr.init_state(example_batch(8))
    losses = []
    for i in range(2):
        state, m = tr.train_step(state, tr.shard(ds[i]))
        losses.append(float(m["loss/total"]))
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(state["params"], tiled=True)
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])
    if a.pid == 0:
        with open(a.out, "w") as f:
            json.dump({"losses": losses, "devices": jax.device_count(),
                       "distributed": distributed, "params": flat.tolist()}, f)
    if distributed:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
