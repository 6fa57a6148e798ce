"""Exact resume after SIGKILL, clean exit on SIGTERM, and failed saves that keep old steps."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from omni_jax.train.checkpoint import Checkpointer, IteratorStateRestore

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
K = 4


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")  # the runs share compiled programs
    return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=
                str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _start(workdir, env, *args):
    os.makedirs(workdir, exist_ok=True)
    return subprocess.Popen([sys.executable, "-u", os.path.join(HERE, "train_script.py"),
                             str(workdir), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(proc, word, timeout=300):
    deadline = time.time() + timeout
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if line.strip() == word or line.startswith(word):
            return lines
    proc.kill()
    raise AssertionError(f"no {word!r} in output {lines}; stderr: {proc.stderr.read()[-3000:]}")


def _finish(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def test_sigkill_resume_is_bitwise_identical(tmp_path, env):
    straight = _start(tmp_path / "straight", env, "--steps", str(2 * K))
    _finish(straight)
    first = _start(tmp_path / "killed", env, "--steps", str(2 * K), "--pause_at", str(K))
    _wait_for(first, "PAUSED")
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "final.npz").exists()
    out = _finish(_start(tmp_path / "killed", env, "--steps", str(2 * K)))
    assert f"start {K}" in out and f"done {2 * K}" in out
    a = np.load(tmp_path / "straight" / "final.npz")
    b = np.load(tmp_path / "killed" / "final.npz")
    assert sorted(a) == sorted(b) and len(a) > 10
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bitwise
    order_a = (tmp_path / "straight" / "order.txt").read_text().split()
    order_b = (tmp_path / "killed" / "order.txt").read_text().split()
    assert len(order_a) == 2 * K and order_b == order_a  # same batches, same order
    assert len(set(order_a)) == 2 * K


def test_sigterm_finishes_step_saves_and_exits_zero(tmp_path, env):
    proc = _start(tmp_path, env, "--steps", "1000", "--sleep", "0.2", "--every", "1000")
    _wait_for(proc, "step 2")
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc)  # exit code 0
    last = int(out.split("done ")[-1].split()[0])
    assert 2 <= last < 1000
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    try:
        assert ckpt.latest_step() == last  # saved although last % every != 0
        saved = ckpt.manager.restore(last, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), data=IteratorStateRestore()))
    finally:
        ckpt.close()
    final = np.load(tmp_path / "final.npz")
    np.testing.assert_array_equal(saved["state"]["params"]["lm_head"]["kernel"],
                                  final["lm_head/kernel"])
    assert int(saved["state"]["step"]) == last
    assert saved["data"]["state"]["next_index"] > 0


def _abstract(tree):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def test_failed_save_keeps_previous_step(tmp_path, monkeypatch):
    good = {"w": jnp.arange(6.0), "step": jnp.int32(1)}
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    assert ckpt.save(1, good, config={"lr": 0.1})
    ckpt.wait()

    def disk_full(self, *args, **kwargs):
        raise OSError("disk full")

    # the state item is written first, then the config item fails: a save broken mid-way
    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "async_save", disk_full)
    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "save", disk_full)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(2, {"w": jnp.zeros(6), "step": jnp.int32(2)}, config={"lr": 0.2})
        ckpt.wait()
    monkeypatch.undo()
    assert "2.orbax-checkpoint-tmp" in os.listdir(tmp_path)  # it failed while writing step 2
    # the same step is never overwritten either
    assert not ckpt.save(1, {"w": jnp.zeros(6), "step": jnp.int32(9)}, force=True)
    ckpt.close()
    fresh = Checkpointer(str(tmp_path))
    try:
        assert fresh.all_steps() == [1]
        restored = fresh.restore(None, _abstract(good))
        np.testing.assert_array_equal(restored["w"], np.arange(6.0))
        assert fresh.restore_config() == {"lr": 0.1}
    finally:
        fresh.close()
    with pytest.raises(TypeError):  # iterator state that is not JSON: refused before writing
        Checkpointer(str(tmp_path / "x")).save(1, good, data_iter=_BadIterator())


class _BadIterator:
    def get_state(self):
        return {"x": object()}


def test_params_missing_from_a_checkpoint_are_named(tmp_path):
    """restore_params of a model with a parameter the checkpoint lacks (e.g. a video tower's
    frame_embed switched on after the stage was saved): a ValueError naming it, not a
    ShapeDtypeStruct left in the tree."""
    params = {"llm": {"w": jnp.arange(6.0)}}
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    try:
        assert ckpt.save(1, {"params": params, "step": jnp.int32(1)}, force=True)
        ckpt.wait()
        got = ckpt.restore_params(1, _abstract(params))
        np.testing.assert_array_equal(got["llm"]["w"], np.arange(6.0))
        wider = {**params, "video_frame_embed": jnp.zeros((3, 4))}
        with pytest.raises(ValueError, match=r"no 1 parameter.*video_frame_embed"):
            ckpt.restore_params(1, _abstract(wider))
    finally:
        ckpt.close()
