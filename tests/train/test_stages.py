"""Stages and the single-device train step: freezing, LR groups, grad accumulation, eval, the
fit loop (TensorBoard, checkpoint), remat / fused head / bf16 options, bad input."""

import glob
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from helpers import (  # noqa: E402
    assert_params_close,
    example_batch,
    parity_config,
    synthetic_dataset,
    tiny_config,
    tiny_llm,
    tiny_model,
)

from omni_jax.parallel.mesh import make_mesh  # noqa: E402
from omni_jax.train import DecoderLM, StageConfig, Trainer, label_tree  # noqa: E402
from omni_jax.train.optim import OptimConfig, make_schedule  # noqa: E402
from omni_jax.train.stages import param_paths  # noqa: E402

LR = 1e-2


def _batches(n, batch_size=8):
    ds = synthetic_dataset(batch_size)
    return [ds[i] for i in range(n)]


def _host(tree):
    return jax.tree.map(np.array, jax.device_get(tree))


def _const_optim(c):
    c.optim.update(schedule="constant", warmup_steps=0, clip_norm=0.0, lr=LR)
    return c


def test_label_tree_patterns_and_groups():
    params = _host(Trainer(tiny_config(), tiny_model()).init_state(example_batch(8))["params"])
    stage = StageConfig(trainable=("^layers_1/", "^lm_head/"),
                        lr_groups={"head": {"pattern": "lm_head", "lr_scale": 0.1}})
    labels = dict(zip(jax.tree.leaves(param_paths(params)), jax.tree.leaves(labels_of(params,
                                                                                       stage))))
    assert labels["layers_0/attn/q/kernel"] == "freeze"
    assert labels["embed/embedding"] == "freeze"
    assert labels["layers_1/mlp/gate/kernel"] == "train"
    assert labels["lm_head/kernel"] == "head"
    with pytest.raises(ValueError, match=r"trainable pattern '\^vision/' matches no parameter"):
        label_tree(params, StageConfig(trainable=("^vision/",)))
    with pytest.raises(ValueError, match="LR group 'vit' pattern 'vit' matches no parameter"):
        label_tree(params, StageConfig(lr_groups={"vit": {"pattern": "vit", "lr_scale": 0.1}}))
    with pytest.raises(ValueError, match="unknown keys"):
        StageConfig.from_dict({"trainable": [".*"], "loss": {"ce": 1.0}})


def labels_of(params, stage):
    return label_tree(params, stage)


def test_freezing_state_and_lr_groups():
    c = _const_optim(tiny_config())
    c.stage.trainable = ("^layers_1/", "^lm_head/")
    c.stage.lr_groups = {"head": {"pattern": "^lm_head/", "lr_scale": 0.1}}
    tr = Trainer(c, tiny_model())
    state = tr.init_state(example_batch(8))
    p0 = _host(state["params"])
    paths = param_paths(p0)
    frozen = {p for p, lab in zip(jax.tree.leaves(paths), jax.tree.leaves(tr.labels))
              if lab == "freeze"}
    state, _ = tr.train_step(state, tr.shard(_batches(1)[0]))
    p1 = _host(state["params"])
    for b in _batches(3)[1:]:
        state, _ = tr.train_step(state, tr.shard(b))
    p3 = _host(state["params"])
    n_frozen = n_train = train_elems = 0
    for path, a, b in zip(jax.tree.leaves(paths), jax.tree.leaves(p0), jax.tree.leaves(p3)):
        if path in frozen:
            n_frozen += 1
            np.testing.assert_array_equal(a, b, err_msg=path)  # bit-identical
        else:
            n_train += 1
            train_elems += a.size
            if not path.endswith("attn/k/bias"):  # softmax is invariant to the key bias
                assert np.any(a != b), path
    assert n_frozen == 1 + 12 + 1 and n_train == 12 + 1  # embed, layers_0, norm | layers_1, head
    # Adam state (mu, nu) exists only for trainable leaves; step counters are scalars
    arrays = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0]
    assert len(arrays) == 2 * n_train
    assert sum(x.size for x in arrays) == 2 * train_elems
    # first Adam step moves each param by ~lr * scale: the lm_head group has lr_scale 0.1
    d_head = np.abs(p1["lm_head"]["kernel"] - p0["lm_head"]["kernel"]).max()
    d_mlp = np.abs(p1["layers_1"]["mlp"]["up"]["kernel"] - p0["layers_1"]["mlp"]["up"]["kernel"])
    np.testing.assert_allclose(d_head, 0.1 * LR, rtol=1e-3)
    np.testing.assert_allclose(d_mlp.max(), LR, rtol=1e-3)


def _two_steps(tr, params=None):
    state = tr.init_state(example_batch(8), params)
    out = []
    for b in _batches(2):
        state, m = tr.train_step(state, tr.shard(b))
        out.append(_host(m))
    return _host(state["params"]), out


def _assert_same_steps(params, metrics, ref_params, ref_metrics):
    for m, r in zip(metrics, ref_metrics):
        for k in ("loss/total", "grad_norm", "ce/ce"):
            np.testing.assert_allclose(m[k], r[k], rtol=1e-5, err_msg=k)
    assert_params_close(params, ref_params, atol=1e-5)


def test_step_variants_match_big_batch_step():
    """Grad accumulation (4 micro-batches), remat + fused LM head, and the eval step all agree
    with the plain big-batch step (one test so the reference compiles once)."""
    ref = Trainer(parity_config(), tiny_model())
    ref_params, ref_metrics = _two_steps(ref)
    accum = Trainer(parity_config(grad_accum=4), tiny_model())
    _assert_same_steps(*_two_steps(accum), ref_params, ref_metrics)
    remat = Trainer(parity_config(), DecoderLM(tiny_llm(remat_policy="dots"), fused_head_chunk=4))
    _assert_same_steps(*_two_steps(remat), ref_params, ref_metrics)
    state = ref.init_state(example_batch(8))
    ev = _host(ref.eval_step(state["params"], ref.shard(_batches(1)[0])))
    np.testing.assert_allclose(ev["loss/total"], ref_metrics[0]["loss/total"], rtol=1e-6)
    with pytest.raises(ValueError, match="batch_size=8 is not divisible by grad_accum=3"):
        Trainer(tiny_config(grad_accum=3), tiny_model())


def test_fit_bf16_loss_falls_tensorboard_checkpoint(tmp_path):
    c = tiny_config(steps=30, log_every=5, tensorboard=True, eval_every=15)
    c.optim.update(lr=3e-2, warmup_steps=2)
    tr = Trainer(c, DecoderLM(tiny_llm(dtype="bfloat16")))  # bf16 compute, fp32 params
    ds = synthetic_dataset(8, num_examples=8)
    state = tr.run(iter(ds.to_iter_dataset()), example_batch(8), str(tmp_path),
                   eval_iter_fn=lambda: iter(ds.to_iter_dataset()))
    losses = [m["train/loss/total"] for _, m in tr.history if "train/loss/total" in m]
    assert len(losses) == 6 and losses[-1] < losses[0] - 1.0, losses
    assert any("eval/loss/total" in m for _, m in tr.history)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state["params"]))
    events = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert len(events) == 1
    blob = open(events[0], "rb").read()
    for tag in (b"train/loss/ce", b"train/grad_norm", b"train/lr", b"train/tokens_per_s",
                b"train/mfu", b"eval/loss/total"):
        assert tag in blob, tag
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["30"]


def test_schedule_warmup_cosine():
    s = make_schedule(OptimConfig(lr=1.0, warmup_steps=10, end_lr_ratio=0.1), total_steps=110)
    np.testing.assert_allclose([s(0), s(5), s(10), s(60), s(110)],
                               [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
    with pytest.raises(ValueError, match="unknown schedule 'cosin'"):
        OptimConfig(schedule="cosin")


def test_bad_mesh_and_batch():
    with pytest.raises(ValueError, match="3 devices in total but there are 1 devices"):
        make_mesh({"data": 3}, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="unknown axes"):
        make_mesh({"dp": 1}, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="unknown keys"):
        Trainer(tiny_config(optim={"learning_rate": 1.0}), tiny_model())
