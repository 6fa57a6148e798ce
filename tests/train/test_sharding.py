"""Sharded step on 8 emulated devices == 1-device step; params really sharded; spec fitting."""

import json
import os
import subprocess
import sys

import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from omni_jax.parallel.rules import DEFAULT_RULES
from omni_jax.parallel.sharding import fit_spec, normalize_rules

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def test_sharded_step_matches_single_device_and_is_sharded():
    """One subprocess (8 emulated devices) checks parity, shardings and the error messages."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharding_script.py")],
                          capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # parity: params within 1e-5 is asserted inside the script (assert_params_close)
    assert result["params_close"]
    for a, b in zip(result["losses"], result["ref_losses"]):
        assert abs(a - b) <= 1e-5 * abs(b)
    # params and Adam moments are really split: [32, 64] over fsdp=2 x tensor=2
    assert result["gate_spec"] == "P('fsdp', 'tensor')"
    assert result["gate_shard"] == [16, 32] and result["gate_devices"] == 8
    assert result["q_shard"] == [16, 2, 8]  # [32, 4 heads, 8] split over fsdp, tensor
    assert result["mu_gate_spec"] == result["gate_spec"]
    assert result["mu_gate_shard"] == [16, 32]
    assert result["batch_shard"] == [2, 16]  # global batch 8 over data*fsdp = 4
    err = result["errors"]
    assert "6 devices in total but there are 8 devices" in err["mesh"]
    assert "batch_size=6 is not divisible by the data parallelism 8" in err["batch"]
    assert "micro batch size (batch_size / grad_accum)=4 is not divisible" in err["micro"]


def test_fit_spec_drops_axes_that_do_not_divide():
    mesh = AbstractMesh((2, 4), ("fsdp", "tensor"))
    # 2 kv heads cannot split over tensor=4 -> replicated; embed 32 over fsdp stays
    assert fit_spec(PartitionSpec("fsdp", "tensor", None), (32, 2, 8), mesh) == \
        PartitionSpec("fsdp", None, None)
    assert fit_spec(PartitionSpec(("fsdp", "tensor")), (4,), mesh) == PartitionSpec("fsdp")
    assert fit_spec(PartitionSpec(("fsdp", "tensor")), (16,), mesh) == \
        PartitionSpec(("fsdp", "tensor"))
    assert normalize_rules(None) == DEFAULT_RULES
    assert normalize_rules([["embed", ["fsdp", "tensor"]]]) == (("embed", ("fsdp", "tensor")),)
    with pytest.raises(ValueError, match="must be \\(logical_name, mesh_axes\\)"):
        normalize_rules([["embed"]])


def test_omni_model_with_towers_and_speech_generator_sharded_equals_one_device():
    """SigLIP + Whisper towers + LLM + speech generator (CE + CTC) on data 2 x fsdp 2 x tensor 2
    equals 1 device after two steps (params within 1e-5, asserted in the script)."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "omni_sharding_script.py")],
                          capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for a, b in zip(result["losses"], result["ref_losses"]):
        for x, y in zip(a, b):
            assert abs(x - y) <= 1e-5 * abs(y)
    for part in ("image_encoder", "audio_encoder", "llm"):  # towers really split
        assert result["specs"][part] == "P('fsdp', 'tensor')", result["specs"]
        full, shard = result["shards"][part]
        assert shard == [full[0] // 2, full[1] // 2]
    assert result["shards"]["speech"] == [[4, 32, 128], [4, 16, 64]]  # experts over fsdp/tensor
