"""Losses: masked CE vs a numpy reference, fused/chunked head == plain, z-loss, registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.train.losses import LOSSES, cross_entropy, make_objective, register_loss


def _data(seed=0, b=2, s=8, d=16, v=32):
    r = np.random.default_rng(seed)
    hidden = r.normal(size=(b, s, d)).astype(np.float32)
    kernel = r.normal(size=(d, v)).astype(np.float32) * 0.3
    targets = r.integers(0, v, size=(b, s)).astype(np.int32)
    mask = (r.random((b, s)) < 0.6).astype(np.int32)
    return hidden, kernel, targets, mask


def _reference(logits, targets, mask):
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    nll = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return (nll * mask).sum() / mask.sum(), (lse**2 * mask).sum() / mask.sum()


def test_masked_ce_and_z_loss_match_numpy():
    h, k, t, m = _data()
    logits = h @ k
    ref_ce, ref_z = _reference(logits, t, m)
    loss, metrics = cross_entropy(jnp.asarray(logits), t, m)
    np.testing.assert_allclose(loss, ref_ce, rtol=1e-5)
    assert metrics["tokens"] == m.sum()
    loss_z, _ = cross_entropy(jnp.asarray(logits), t, m, z_loss=1e-2)
    np.testing.assert_allclose(loss_z, ref_ce + 1e-2 * ref_z, rtol=1e-5)


def test_fused_chunked_head_matches_logits_and_grads():
    h, k, t, m = _data()

    def plain(h, k):
        return cross_entropy(jnp.einsum("bsd,dv->bsv", h, k), t, m, z_loss=1e-3)[0]

    def fused(h, k):
        return cross_entropy(None, t, m, z_loss=1e-3, hidden=h, kernel=k, chunk_size=2)[0]

    (lp, gp), (lf, gf) = (jax.value_and_grad(f, argnums=(0, 1))(h, k) for f in (plain, fused))
    np.testing.assert_allclose(lf, lp, rtol=1e-5)
    for a, b in zip(gf, gp):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # without z_loss the head runs through train.fused_ce, which takes any chunk size
    def fused_ce(h, k):
        return cross_entropy(None, t, m, hidden=h, kernel=k, chunk_size=3)[0]

    def plain_ce(h, k):
        return cross_entropy(jnp.einsum("bsd,dv->bsv", h, k), t, m)[0]

    (lp, gp), (lf, gf) = (jax.value_and_grad(f, argnums=(0, 1))(h, k) for f in (plain_ce, fused_ce))
    np.testing.assert_allclose(lf, lp, rtol=1e-5)
    for a, b in zip(gf, gp):
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="not divisible by chunk_size 3"):  # z_loss: seq chunks
        cross_entropy(None, t, m, z_loss=1e-3, hidden=h, kernel=k, chunk_size=3)


def test_registry_and_weighted_objective():
    @register_loss("test_mean_logit")
    def mean_logit(outputs, batch, *, scale=1.0):
        v = scale * jnp.mean(outputs["logits"])
        return v, {"value": v}

    try:
        h, k, t, m = _data()
        outputs = {"logits": jnp.asarray(h @ k)}
        batch = {"targets": t, "loss_mask": m}
        obj = make_objective({"ce": 1.0, "test_mean_logit": {"weight": 0.5, "scale": 2.0}})
        total, metrics = obj(outputs, batch)
        ce = cross_entropy(outputs["logits"], t, m)[0]
        extra = 2.0 * jnp.mean(outputs["logits"])
        np.testing.assert_allclose(total, ce + 0.5 * extra, rtol=1e-6)
        np.testing.assert_allclose(metrics["loss/test_mean_logit"], extra, rtol=1e-6)
        assert "test_mean_logit/value" in metrics and "ce/tokens" in metrics
        with pytest.raises(ValueError, match="already registered"):
            register_loss("test_mean_logit")(lambda o, b: (0.0, {}))
    finally:
        LOSSES.pop("test_mean_logit", None)
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        make_objective({"nope": 1.0})
    with pytest.raises(ValueError, match="needs a 'weight'"):
        make_objective({"ce": {"z_loss": 1e-4}})
