"""Speech losses: CTC vs torch (value, gradient, feasibility), DPO/unit CE vs numpy, MoE aux."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from omni_jax.train.losses import LOSSES, make_objective
from omni_jax.train.speech_losses import ctc_loglik, ctc_nll

V = 7  # units; blank = V
F = torch.nn.functional


def _ctc_batch(targets, frames, t_max, seed=0, scale=2.0):
    """Unnormalised logits [B, T, V+1] (garbage on padded frames), masks, units padded -100."""
    r = np.random.default_rng(seed)
    b, u_max = len(targets), max(1, max(len(t) for t in targets))
    z = (scale * r.normal(size=(b, t_max, V + 1))).astype(np.float32)
    frame_mask = np.arange(t_max)[None] < np.asarray(frames)[:, None]
    z[~frame_mask] = 50.0  # must not reach the loss
    units = np.full((b, u_max), -100, np.int32)
    unit_mask = np.zeros((b, u_max), bool)
    for i, t in enumerate(targets):
        units[i, :len(t)], unit_mask[i, :len(t)] = t, True
    return z, frame_mask, units, unit_mask


def _torch_ctc(z, frame_mask, units, unit_mask, reduction, zero_infinity=True):
    """torch CTC (float64) on log_softmax(z) and its gradient wrt z when reduction != "none"."""
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    loss = F.ctc_loss(torch.log_softmax(zt, -1).transpose(0, 1),
                      torch.tensor(np.where(unit_mask, units, 0), dtype=torch.long),
                      torch.tensor(frame_mask.sum(1)), torch.tensor(unit_mask.sum(1)),
                      blank=V, reduction=reduction, zero_infinity=zero_infinity)
    if reduction == "none":
        return loss.detach().numpy(), None
    loss.backward()
    return loss.item(), zt.grad.numpy()


def _ctc_value_and_grad(z, frame_mask, units, unit_mask, **options):
    def f(z):
        outputs = {"speech_log_probs": jax.nn.log_softmax(z, -1), "speech_frame_mask": frame_mask}
        batch = {"speech_units": units, "speech_unit_mask": unit_mask}
        return LOSSES["ctc"](outputs, batch, **options)
    (loss, metrics), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(jnp.asarray(z))
    return loss, metrics, np.asarray(grad)


# repeated labels, an item exactly at the bound (4 frames for [1, 1, 4]), an item infeasible
# only through its repeats (6 frames < 4 + 3), different T_b and U_b.
TARGETS = [[3, 3, 5, 2, 2], [1, 1, 4], [2, 2, 2, 2], [0, 6]]
FRAMES = [9, 4, 6, 8]


def test_ctc_value_and_grad_match_torch_sum_over_units():
    z, fm, units, um = _ctc_batch(TARGETS, FRAMES, 9)
    loss, metrics, grad = _ctc_value_and_grad(z, fm, units, um)
    ref, ref_grad = _torch_ctc(z, fm, units, um, "sum")
    ref, ref_grad = ref / um.sum(), ref_grad / um.sum()
    np.testing.assert_allclose(loss, ref, rtol=1e-6)  # measured rel 8.8e-8
    np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=1e-6)  # measured 1.1e-7
    assert np.abs(ref_grad[2]).max() == 0 and np.abs(grad[2]).max() == 0  # infeasible item
    assert np.abs(grad[~fm]).max() == 0  # padded frames
    assert np.abs(grad[:2]).max() > 1e-3 and np.abs(grad[3]).max() > 1e-3
    assert metrics["units"] == 14 and metrics["frames"] == 27 and metrics["infeasible"] == 1
    np.testing.assert_allclose(metrics["ctc"], loss, rtol=0, atol=0)


def test_ctc_batch_mean_matches_torch_mean():
    z, fm, units, um = _ctc_batch(TARGETS, FRAMES, 9, seed=1)
    loss, _, grad = _ctc_value_and_grad(z, fm, units, um, normalize="batch_mean")
    ref, ref_grad = _torch_ctc(z, fm, units, um, "mean")
    np.testing.assert_allclose(loss, ref, rtol=3e-7)  # measured rel 3.2e-8
    np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=1e-6)  # measured 9.6e-8


def test_ctc_nll_per_item_and_feasibility_vs_torch():
    r = np.random.default_rng(3)  # 3-unit vocab: many repeats, a mix of (in)feasible items
    targets = [list(r.integers(0, 3, size=n)) for n in r.integers(1, 7, size=12)]
    frames = [int(r.integers(max(1, len(t) - 1), len(t) + 5)) for t in targets]
    z, fm, units, um = _ctc_batch(targets, frames, max(frames), seed=3)
    lp = jax.nn.log_softmax(jnp.asarray(z), -1)
    ref_inf, _ = _torch_ctc(z, fm, units, um, "none", zero_infinity=False)
    ref, _ = _torch_ctc(z, fm, units, um, "none")
    ref_feasible = np.isfinite(ref_inf)
    assert 2 <= (~ref_feasible).sum() <= 10  # the batch exercises both kinds
    nll, feasible = ctc_nll(lp, fm, units, um)
    np.testing.assert_array_equal(feasible, ref_feasible)
    np.testing.assert_allclose(nll, ref, rtol=1e-6)  # measured rel 9.3e-8
    nll_inf, _ = ctc_nll(lp, fm, units, um, zero_infinity=False)
    np.testing.assert_allclose(nll_inf, ref_inf, rtol=1e-6)  # inf where torch is
    np.testing.assert_allclose(ctc_loglik(lp, fm, units, um), -ref / um.sum(1), rtol=1e-6)
    np.testing.assert_allclose(ctc_loglik(lp, fm, units, um, normalize=False), -ref, rtol=1e-6)
    _, metrics, _ = _ctc_value_and_grad(z, fm, units, um)
    assert metrics["infeasible"] == (~ref_feasible).sum()


def test_ctc_empty_target_row_is_zero_and_not_counted():
    z, fm, units, um = _ctc_batch([[1, 2], []], [5, 5], 5)
    lp = jax.nn.log_softmax(jnp.asarray(z), -1)
    nll, feasible = ctc_nll(lp, fm, units, um)
    assert nll[1] == 0 and nll[0] > 0 and bool(feasible[1])
    assert ctc_loglik(lp, fm, units, um)[1] == 0
    loss, metrics, grad = _ctc_value_and_grad(z, fm, units, um)
    assert np.abs(grad[1]).max() == 0 and np.abs(grad[0]).max() > 0
    assert metrics["units"] == 2 and metrics["infeasible"] == 0
    np.testing.assert_allclose(loss, nll[0] / 2, rtol=1e-6)


def _log_sigmoid(x):
    return -np.log1p(np.exp(-x))


DPO = {"dpo_policy_chosen": np.array([-1.2, -0.5, -2.0, 9.0], np.float32),
       "dpo_policy_rejected": np.array([-1.5, -0.4, -1.0, -9.0], np.float32),
       "dpo_ref_chosen": np.array([-1.3, -0.6, -1.7, 0.0], np.float32),
       "dpo_ref_rejected": np.array([-1.4, -0.7, -1.5, 0.0], np.float32)}
DPO_MASK = np.array([1, 1, 1, 0], np.float32)  # the last row is padding


@pytest.mark.parametrize("kind,beta,ls", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2),
                                          ("ipo", 0.1, 0.0), ("ipo", 2.0, 0.0)])
def test_dpo_matches_hand_computation(kind, beta, ls):
    pc, pr, rc, rr = (DPO[k][:3].astype(np.float64) for k in DPO)
    x = (pc - pr) - (rc - rr)
    if kind == "sigmoid":
        per = -(1 - ls) * _log_sigmoid(beta * x) - ls * _log_sigmoid(-beta * x)
    else:
        per = (x - 1 / (2 * beta)) ** 2
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    obj = make_objective({"dpo": {"weight": 1.0, "beta": beta, "kind": kind,
                                  "label_smoothing": ls}})
    total, m = jax.jit(obj)({k: jnp.asarray(v) for k, v in DPO.items()}, {"dpo_mask": DPO_MASK})
    np.testing.assert_allclose(total, per.mean(), rtol=1e-6)
    np.testing.assert_allclose(m["dpo/rewards/chosen"], chosen.mean(), rtol=1e-6)
    np.testing.assert_allclose(m["dpo/rewards/rejected"], rejected.mean(), rtol=1e-6)
    np.testing.assert_allclose(m["dpo/margin"], (chosen - rejected).mean(), rtol=1e-6)
    assert float(m["dpo/accuracy"]) == pytest.approx(np.mean(chosen > rejected), abs=1e-7)
    assert 0 < np.mean(chosen > rejected) < 1 and m["dpo/pairs"] == 3


def test_dpo_gradient_reaches_policy_only_and_mask_default():
    def f(d):
        return LOSSES["dpo"](d, {})[0]
    g = jax.grad(f)({k: jnp.asarray(v) for k, v in DPO.items()})
    assert np.abs(g["dpo_ref_chosen"]).max() == 0 and np.abs(g["dpo_ref_rejected"]).max() == 0
    assert np.abs(g["dpo_policy_chosen"]).min() > 0
    x = (DPO["dpo_policy_chosen"] - DPO["dpo_policy_rejected"]
         - DPO["dpo_ref_chosen"] + DPO["dpo_ref_rejected"]).astype(np.float64)
    np.testing.assert_allclose(f(DPO), -_log_sigmoid(0.1 * x).mean(), rtol=1e-6)  # all 4 pairs


@pytest.mark.parametrize("options,match", [({"beta": -1}, "beta"), ({"beta": 0.0}, "beta"),
                                           ({"kind": "kto"}, "kind"),
                                           ({"label_smoothing": 0.5}, "label_smoothing"),
                                           ({"kind": "ipo", "label_smoothing": 0.1}, "sigmoid")])
def test_dpo_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        LOSSES["dpo"].check_options(**options)
    with pytest.raises(ValueError, match=match):
        make_objective({"dpo": {"weight": 1.0, **options}})(DPO, {})


def test_unit_ce_matches_numpy():
    r = np.random.default_rng(5)
    logits = r.normal(size=(2, 6, V + 1)).astype(np.float32)
    targets = r.integers(0, V + 1, size=(2, 6)).astype(np.int32)
    targets[0, :3] = logits[0, :3].argmax(-1)  # some hits
    mask = np.ones((2, 6), bool)
    mask[1, 4:] = False
    targets[1, 4:] = -100  # ignore ids under the mask stay harmless
    lg = logits.astype(np.float64)
    lse = np.log(np.exp(lg).sum(-1))
    nll = lse - np.take_along_axis(lg, np.where(mask, targets, 0)[..., None], -1)[..., 0]
    outputs = {"speech_ar_logits": logits, "speech_ar_targets": targets, "speech_ar_mask": mask}
    loss, m = LOSSES["unit_ce"](outputs, {})
    np.testing.assert_allclose(loss, nll[mask].mean(), rtol=1e-6)
    hits = (logits.argmax(-1) == targets)[mask]
    assert float(m["accuracy"]) == pytest.approx(hits.mean(), abs=1e-7) and 0 < hits.mean() < 1
    assert m["tokens"] == 10
    loss_z, _ = LOSSES["unit_ce"](outputs, {}, z_loss=1e-2)
    np.testing.assert_allclose(loss_z, nll[mask].mean() + 1e-2 * (lse[mask] ** 2).mean(),
                               rtol=1e-6)


def test_moe_aux_weights_and_absence():
    outputs = {"moe_aux": {"load_balance": jnp.float32(1.5), "router_z": jnp.float32(4.0)}}
    loss, m = LOSSES["moe_aux"](outputs, {})
    np.testing.assert_allclose(loss, 1e-2 * 1.5 + 1e-3 * 4.0, rtol=1e-6)
    assert m["present"] == 1 and m["load_balance"] == 1.5 and m["router_z"] == 4.0
    loss, _ = LOSSES["moe_aux"](outputs, {}, load_balance=0.5, router_z=0.0)
    np.testing.assert_allclose(loss, 0.75, rtol=1e-6)
    loss, m = LOSSES["moe_aux"]({}, {})
    assert loss == 0 and m["present"] == 0
    with pytest.raises(ValueError, match="'router_z'"):
        LOSSES["moe_aux"]({"moe_aux": {"load_balance": 1.0}}, {})


_CTC_OUT = {"speech_log_probs": np.zeros((1, 4, V + 1), np.float32),
            "speech_frame_mask": np.ones((1, 4), bool)}
_CTC_BATCH = {"speech_units": np.zeros((1, 2), np.int32),
              "speech_unit_mask": np.ones((1, 2), bool)}


@pytest.mark.parametrize("loss,outputs,batch,key", [
    ("ctc", {"speech_frame_mask": _CTC_OUT["speech_frame_mask"]}, _CTC_BATCH, "speech_log_probs"),
    ("ctc", _CTC_OUT, {"speech_units": _CTC_BATCH["speech_units"]}, "speech_unit_mask"),
    ("unit_ce", {"speech_ar_logits": 0, "speech_ar_mask": 0}, {}, "speech_ar_targets"),
    ("dpo", {k: v for k, v in DPO.items() if k != "dpo_ref_rejected"}, {}, "dpo_ref_rejected"),
])
def test_missing_keys_raise_naming_key_and_loss(loss, outputs, batch, key):
    with pytest.raises(ValueError, match=rf"loss '{loss}' needs .*\['{key}'\]"):
        make_objective({loss: 1.0})(outputs, batch)


def test_combined_objective_and_registry_from_losses_alone():
    z, fm, units, um = _ctc_batch(TARGETS, FRAMES, 9)
    outputs = {"speech_log_probs": jax.nn.log_softmax(jnp.asarray(z), -1),
               "speech_frame_mask": fm, **DPO}
    batch = {"speech_units": units, "speech_unit_mask": um}
    obj = make_objective({"ctc": 1.0, "dpo": {"weight": 0.5, "beta": 0.2}, "moe_aux": 1.0})
    total, m = jax.jit(obj)(outputs, batch)
    np.testing.assert_allclose(total, m["loss/ctc"] + 0.5 * m["loss/dpo"], rtol=1e-6)
    assert m["moe_aux/present"] == 0 and m["ctc/infeasible"] == 1
    code = "import omni_jax.train.losses as L; print(sorted(L.LOSSES))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=True).stdout
    assert {"ctc", "unit_ce", "dpo", "moe_aux"} <= set(eval(out))
