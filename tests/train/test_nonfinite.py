"""Numerical guard: a step with a NaN loss is skipped (params and optimizer state untouched) and
the run goes on; N skipped steps in a row stop it with the last checkpoint restorable."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import example_batch, synthetic_dataset, tiny_config, tiny_model

from omni_jax.train.losses import LOSSES
from omni_jax.train.trainer import NonFiniteError, Trainer


def poisoned_ce(outputs, batch):
    """ce, or NaN for a batch whose 'poison' row flags are set (an injected numerical fault)."""
    loss, metrics = LOSSES["ce"](outputs, batch)
    return jnp.where(jnp.any(batch["poison"] > 0), jnp.nan, loss), metrics


def stream(poisoned_steps: set[int]):
    """Synthetic batches with a 'poison' flag on the given (1-based) steps."""
    base = synthetic_dataset(8)
    ds = grain.MapDataset.range(10_000).map(
        lambda i: {**base[i], "poison": np.full(8, float(i + 1 in poisoned_steps), np.float32)})
    return iter(ds)


def trainer(**kw):
    c = tiny_config(steps=6, **kw)
    c.stage.losses = {"poisoned_ce": 1.0}
    return Trainer(c, tiny_model(), losses={"poisoned_ce": poisoned_ce})


def test_a_nan_step_is_skipped_and_the_run_continues():
    t = trainer()
    example = {**example_batch(8), "poison": np.zeros(8, np.float32)}
    seen = {}

    def hook(step, state, metrics):
        seen[step] = (jax.device_get(state), float(metrics["skipped"]))

    state = t.fit(t.init_state(example), stream({3}), hooks=[hook])
    assert int(state["step"]) == 6
    assert [seen[s][1] for s in range(1, 7)] == [0, 0, 1, 0, 0, 0]
    for a, b in zip(jax.tree.leaves(seen[2][0]["params"]), jax.tree.leaves(seen[3][0]["params"])):
        np.testing.assert_array_equal(a, b)  # the NaN step left the params
    for a, b in zip(jax.tree.leaves(seen[2][0]["opt_state"]),
                    jax.tree.leaves(seen[3][0]["opt_state"])):
        np.testing.assert_array_equal(a, b)  # ... and Adam's moments as they were
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(seen[3][0]["params"]), jax.tree.leaves(seen[4][0]["params"])))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state["params"])))


def test_n_nan_steps_in_a_row_stop_with_the_last_checkpoint_restorable(tmp_path):
    t = trainer(max_nonfinite_steps=3)
    t.config.checkpoint.update(every_steps=1, async_save=False)
    example = {**example_batch(8), "poison": np.zeros(8, np.float32)}
    ckpt = t.checkpointer(str(tmp_path))
    with pytest.raises(NonFiniteError, match="3 consecutive steps had a non-finite loss"):
        t.fit(t.init_state(example), stream({3, 4, 5, 6}), checkpointer=ckpt)
    ckpt.close()
    t2 = trainer()
    ckpt = t2.checkpointer(str(tmp_path))
    restored = t2.restore_or_init(example, ckpt)
    step = int(restored["step"])
    assert step == 5  # saved every step; the stop comes before step 6 is saved
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(restored)))
    ckpt.close()
