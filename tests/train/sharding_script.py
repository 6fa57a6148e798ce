"""8 emulated CPU devices: a (data=2, fsdp=2, tensor=2) train step vs the 1-device step.

Run as a subprocess (XLA_FLAGS must be set before jax is imported); prints one JSON line.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from helpers import assert_params_close, example_batch, parity_config, synthetic_dataset, tiny_model  # noqa: E402

from omni_jax.parallel.mesh import make_mesh  # noqa: E402
from omni_jax.train import Trainer  # noqa: E402


def errors() -> dict[str, str]:
    out = {}
    for name, fn in {
        "mesh": lambda: make_mesh({"data": 3, "tensor": 2}),
        "batch": lambda: Trainer(parity_config(batch_size=6, mesh={"data": 4, "fsdp": 2}),
                                 tiny_model()),
        "micro": lambda: Trainer(parity_config(batch_size=8, grad_accum=2,
                                               mesh={"data": 8}), tiny_model()),
    }.items():
        try:
            fn()
            out[name] = "no error"
        except ValueError as e:
            out[name] = str(e)
    return out


def main():
    assert jax.device_count() == 8, jax.devices()
    batches = [synthetic_dataset(8)[i] for i in range(2)]
    ref = Trainer(parity_config(), tiny_model(), mesh=make_mesh({}, jax.devices()[:1]))
    state = ref.init_state(example_batch(8))
    params0 = jax.device_get(state["params"])
    ref_losses = []
    for b in batches:
        state, m = ref.train_step(state, ref.shard(b))
        ref_losses.append(float(m["loss/total"]))
    ref_params = jax.device_get(state["params"])

    tr = Trainer(parity_config(mesh={"data": 2, "fsdp": 2, "tensor": 2}), tiny_model())
    state = tr.init_state(example_batch(8), params=params0)
    losses = []
    for b in batches:
        state, m = tr.train_step(state, tr.shard(b))
        losses.append(float(m["loss/total"]))
    assert_params_close(state["params"], ref_params, atol=1e-5)  # raises on mismatch

    gate = state["params"]["layers_0"]["mlp"]["gate"]["kernel"]  # [embed 32, mlp 64]
    q = state["params"]["layers_0"]["attn"]["q"]["kernel"]  # [embed, heads 4, head_dim]
    mu = state["opt_state"][1].inner_states["train"].inner_state[0].mu
    mu_gate = mu["layers_0"]["mlp"]["gate"]["kernel"]
    batch = tr.shard(batches[0])["input_ids"]
    print(json.dumps({
        "losses": losses, "ref_losses": ref_losses, "params_close": True,
        "gate_spec": str(gate.sharding.spec),
        "gate_shard": list(gate.addressable_shards[0].data.shape),
        "gate_devices": len(gate.sharding.device_set),
        "q_spec": str(q.sharding.spec), "q_shard": list(q.addressable_shards[0].data.shape),
        "mu_gate_spec": str(mu_gate.sharding.spec),
        "mu_gate_shard": list(mu_gate.addressable_shards[0].data.shape),
        "batch_shard": list(batch.addressable_shards[0].data.shape),
        "errors": errors(),
    }))


if __name__ == "__main__":
    main()
