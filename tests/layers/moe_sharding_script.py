"""8 emulated CPU devices: SparseMoE / SoftMoE forward + gradients with expert=2 and expert=4
(data / fsdp filling the rest) vs 1 device, and the expert weights really split over `expert`.

Run as a subprocess (XLA_FLAGS must be set before jax is imported); prints one JSON line.
"""

import json
import os

os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                           "--xla_backend_optimization_level=0 "
                           "--xla_llvm_disable_expensive_passes=true")
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from omni_jax.layers.moe import MoEConfig, SoftMoE, SparseMoE  # noqa: E402
from omni_jax.parallel.mesh import make_mesh  # noqa: E402
from omni_jax.parallel.rules import DEFAULT_RULES  # noqa: E402
from omni_jax.parallel.sharding import batch_sharding, tree_shardings  # noqa: E402

TOL = 1e-5
CFG = MoEConfig(num_experts=8, top_k=2, expert_hidden=16, shared_expert_hidden=24,
                capacity_factor=1.0, init_std=0.2)
SOFT = SoftMoE(num_experts=4, hidden=24, features=20, init_std=0.2)


def sparse_loss(params, x, mask, w):
    y, aux = SparseMoE(CFG).apply(params, x, mask)
    return jnp.sum(y * w) + aux["load_balance"] + 0.1 * aux["router_z"], (y, aux)


def soft_loss(params, x, mask, w):
    y = SOFT.apply(params, x)
    return jnp.sum(y * w[..., :20]), (y, {})


def max_err(a, b) -> float:
    """Max over leaves of max|a - b| / max(1, max|b|): absolute for O(1) leaves, relative for
    large ones (the summed loss and the parameter gradients add up thousands of terms)."""
    def one(u, v):
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        return float(np.max(np.abs(u - v)) / max(1.0, float(np.max(np.abs(v)))))

    return max(jax.tree.leaves(jax.tree.map(one, jax.device_get(a), jax.device_get(b))),
               default=0.0)


def run(loss, module, example, args, mesh=None):
    """(loss, (y, aux)), (param grads, x grads); sharded when a mesh is given."""
    params = nn.unbox(module.init(jax.random.key(0), *example))
    fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    if mesh is None:
        return params, jax.jit(fn)(params, *args), None, None
    boxed = jax.eval_shape(module.init, jax.random.key(0), *example)
    shard = tree_shardings(boxed, mesh, DEFAULT_RULES)
    rep, rows = NamedSharding(mesh, PartitionSpec()), batch_sharding(mesh, DEFAULT_RULES, 3)
    ins = (shard, rows, batch_sharding(mesh, DEFAULT_RULES, 2), rows)
    outs = ((rep, (rows, rep)), (shard, rows))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        placed = jax.device_put((params, *args), ins)
        jitted = jax.jit(fn, in_shardings=ins, out_shardings=outs)
        out = jitted(*placed)
        hlo = jitted.lower(*placed).compile().as_text()
    return placed[0], out, hlo, shard


def main():
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16, 32)).astype(np.float32)
    w = rng.standard_normal((8, 16, 32)).astype(np.float32)
    mask = np.ones((8, 16), np.int32)
    mask[2, 11:] = 0
    mask[5, :4] = 0
    args = (x, mask, w)
    # the reference runs on one device without a mesh or rules (constraints are no-ops)
    ref_sparse = run(sparse_loss, SparseMoE(CFG), (x, mask), args)[1]
    ref_soft = run(soft_loss, SOFT, (x,), args)[1]
    result = {}
    for ep, shape in ((2, {"expert": 2, "data": 2, "fsdp": 2}), (4, {"expert": 4, "fsdp": 2})):
        mesh = make_mesh(shape)
        params, (val, grads), hlo, _ = run(sparse_loss, SparseMoE(CFG), (x, mask), args, mesh)
        soft_params, (soft_val, soft_grads), _, _ = run(soft_loss, SOFT, (x,), args, mesh)
        r = {"sparse_err": max_err(val[1], ref_sparse[0][1]),  # y and the aux scalars
             "sparse_loss_err": max_err(val[0], ref_sparse[0][0]),
             "sparse_grad_err": max_err(grads, ref_sparse[1]),
             "sparse_dropped": float(val[1][1]["dropped_fraction"]),
             "soft_err": max_err(soft_val[1], ref_soft[0][1]),
             "soft_loss_err": max_err(soft_val[0], ref_soft[0][0]),
             "soft_grad_err": max_err(soft_grads, ref_soft[1]),
             "all_to_all": hlo.count("all-to-all("),
             "all_gather": hlo.count("all-gather(")}
        for k in [k for k in r if k.endswith("_err")]:
            assert r[k] <= TOL, (ep, k, r)
        gk, ggk = params["params"]["gate_kernel"], grads[0]["params"]["gate_kernel"]
        r.update(gate_kernel_spec=str(gk.sharding.spec),
                 gate_kernel_shard=list(gk.addressable_shards[0].data.shape),
                 grad_gate_kernel_spec=str(ggk.sharding.spec),
                 grad_gate_kernel_shard=list(ggk.addressable_shards[0].data.shape),
                 soft_fc1_spec=str(soft_params["params"]["fc1_kernel"].sharding.spec),
                 soft_fc1_shard=list(
                     soft_params["params"]["fc1_kernel"].addressable_shards[0].data.shape))
        result[str(ep)] = r
    print(json.dumps(result))


if __name__ == "__main__":
    main()
