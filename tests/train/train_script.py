"""Small training run used by the resume / preemption tests (run as a subprocess).

python train_script.py WORKDIR --steps N [--pause_at K] [--sleep S] [--every E]
Appends "step input_ids-hash" per consumed batch to WORKDIR/order.txt, prints "step N" after each
step, writes the final params to WORKDIR/final.npz. --pause_at K: after step K's checkpoint is
on disk, print PAUSED and sleep (the test then SIGKILLs the process).
"""

import argparse
import hashlib
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from helpers import example_batch, synthetic_dataset, tiny_config, tiny_model  # noqa: E402

from omni_jax.train import Trainer  # noqa: E402
from omni_jax.train.stages import path_str  # noqa: E402


class LoggedIterator:
    """Delegates to a grain iterator and records which batch each step consumed."""

    def __init__(self, it, path):
        self.it, self.path, self.n = it, path, 0

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)

    def __next__(self):
        batch = next(self.it)
        digest = hashlib.sha1(np.ascontiguousarray(batch["input_ids"]).tobytes()).hexdigest()
        with open(self.path, "a") as f:
            f.write(f"{digest}\n")
        return batch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--pause_at", type=int, default=0)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--every", type=int, default=2)
    a = ap.parse_args()
    cfg = tiny_config(steps=a.steps)
    cfg.checkpoint.every_steps = a.every
    cfg.log_every = 100
    trainer = Trainer(cfg, tiny_model())
    it = LoggedIterator(iter(synthetic_dataset(cfg.batch_size).to_iter_dataset()),
                        os.path.join(a.workdir, "order.txt"))
    ckpt = trainer.checkpointer(a.workdir)
    state = trainer.restore_or_init(example_batch(cfg.batch_size), ckpt, it)
    print(f"start {int(state['step'])}", flush=True)

    def hook(step, state, metrics):
        print(f"step {step}", flush=True)
        if step == a.pause_at:
            ckpt.wait()
            print("PAUSED", flush=True)
            time.sleep(600)
        time.sleep(a.sleep)

    state = trainer.fit(state, it, checkpointer=ckpt, hooks=[hook])
    ckpt.close()
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state["params"]))[0]
    np.savez(os.path.join(a.workdir, "final.npz"), **{path_str(p): v for p, v in flat})
    print(f"done {int(state['step'])}", flush=True)


if __name__ == "__main__":
    main()
