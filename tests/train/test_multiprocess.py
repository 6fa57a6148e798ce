"""Two processes on 127.0.0.1 with jax.distributed: the step's loss equals the single process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out, *args):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.Popen([sys.executable, os.path.join(HERE, "mp_script.py"), str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_two_process_step_matches_single_process(tmp_path):
    coord = f"127.0.0.1:{_free_port()}"
    procs = [_launch(tmp_path / "mp.json", "--coordinator", coord, "--nproc", "2", "--pid",
                     str(i)) for i in range(2)]
    single = _launch(tmp_path / "single.json")
    for p in [*procs, single]:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    mp = json.loads((tmp_path / "mp.json").read_text())
    ref = json.loads((tmp_path / "single.json").read_text())
    assert mp["distributed"] and mp["devices"] == 2
    assert not ref["distributed"] and ref["devices"] == 1
    np.testing.assert_allclose(mp["losses"], ref["losses"], rtol=1e-5)
    np.testing.assert_allclose(mp["params"], ref["params"], atol=1e-5)
    assert len(mp["params"]) > 10_000


def test_distributed_settings_validated(monkeypatch):
    from omni_jax.parallel.mesh import maybe_initialize_distributed

    for k in ("COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID"):
        monkeypatch.delenv(f"OMNI_{k}", raising=False)
        monkeypatch.delenv(f"JAX_{k}", raising=False)
    monkeypatch.delenv("OMNI_DISTRIBUTED", raising=False)
    assert maybe_initialize_distributed() is False  # single process: nothing to do
    with pytest.raises(ValueError, match="need coordinator_address, num_processes and process_id"):
        maybe_initialize_distributed("127.0.0.1:1234")
    monkeypatch.setenv("OMNI_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="process_id 5 not in \\[0, 2\\)"):
        maybe_initialize_distributed("127.0.0.1:1234", process_id=5)
