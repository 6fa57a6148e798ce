"""fused_cross_entropy: value and gradients equal the naive logits -> log_softmax path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.train.fused_ce import fused_cross_entropy

N, D, V = 37, 16, 50  # N not a multiple of the chunk: exercises the padded last chunk


def _inputs(seed=0, tied=False):
    k = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(k[0], (N, D))
    kernel = jax.random.normal(k[1], (V, D) if tied else (D, V)) * 0.5
    targets = jax.random.randint(k[2], (N,), 0, V)
    mask = (jax.random.uniform(k[3], (N,)) > 0.3).astype(jnp.float32)
    return hidden, kernel, targets, mask


def _naive(hidden, kernel, targets, mask, tied):
    logits = hidden @ (kernel.T if tied else kernel)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], -1)[:, 0]
    return jnp.sum(nll * mask), jnp.sum(mask)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [8, 64])
def test_value_and_grads_match_naive(tied, chunk):
    h, k, t, m = _inputs(tied=tied)
    want = jax.value_and_grad(lambda h, k: _naive(h, k, t, m, tied)[0], (0, 1))(h, k)
    got = jax.jit(jax.value_and_grad(
        lambda h, k: fused_cross_entropy(h, k, t, m, tied=tied, chunk_size=chunk)[0],
        (0, 1)))(h, k)
    assert got[0].shape == () and abs(float(got[0] - want[0])) <= 1e-5 * abs(float(want[0]))
    for g, w in zip(got[1], want[1]):
        assert g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)
    count = fused_cross_entropy(h, k, t, m, tied=tied, chunk_size=chunk)[1]
    assert float(count) == float(jnp.sum(m))


def test_masked_tokens_are_ignored():
    h, k, t, m = _inputs(seed=1)
    loss = lambda h: fused_cross_entropy(h, k, t, m, chunk_size=16)[0]  # noqa: E731
    # changing the hidden state and target of a masked token changes nothing
    i = int(np.flatnonzero(np.asarray(m) == 0)[0])
    h2, t2 = h.at[i].set(100.0), t.at[i].set((t[i] + 1) % V)
    assert float(loss(h)) == float(fused_cross_entropy(h2, k, t2, m, chunk_size=16)[0])
    g = jax.grad(loss)(h)
    assert np.all(np.asarray(g)[np.asarray(m) == 0] == 0)
    assert np.all(np.abs(np.asarray(g)[np.asarray(m) == 1]).sum(-1) > 0)


def test_no_mask_counts_all_and_mask_gradient():
    h, k, t, m = _inputs(seed=2)
    s, n = fused_cross_entropy(h, k, t, chunk_size=16)
    assert float(n) == N
    np.testing.assert_allclose(float(s), float(_naive(h, k, t, jnp.ones(N), False)[0]),
                               rtol=1e-5)
    # float mask weights are differentiable: d loss_sum / d mask = per-token NLL
    gm = jax.grad(lambda m: fused_cross_entropy(h, k, t, m, chunk_size=16)[0])(m)
    gw = jax.grad(lambda m: _naive(h, k, t, m, False)[0])(m)
    np.testing.assert_allclose(np.asarray(gm), np.asarray(gw), rtol=1e-5, atol=1e-5)


def test_bf16_hidden_keeps_dtypes():
    h, k, t, m = _inputs(seed=3)
    g = jax.grad(lambda h, k: fused_cross_entropy(h, k, t, m)[0], (0, 1))(
        h.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
    assert g[0].dtype == jnp.bfloat16 and g[1].dtype == jnp.bfloat16
    want = jax.grad(lambda h: _naive(h, k, t, m, False)[0])(h)
    assert float(jnp.max(jnp.abs(g[0].astype(jnp.float32) - want))) < 0.05


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden=jnp.zeros((2, 3, D))), "hidden must be"),
    (dict(kernel=jnp.zeros((D + 1, V))), "kernel .* must be"),
    (dict(targets=jnp.zeros((N,), jnp.float32)), "targets must be"),
    (dict(mask=jnp.ones((N + 1,))), "mask must be"),
    (dict(chunk_size=0), "chunk_size must be positive"),
])
def test_bad_input(kwargs, match):
    h, k, t, m = _inputs()
    args = dict(hidden=h, kernel=k, targets=t, mask=m, chunk_size=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fused_cross_entropy(args.pop("hidden"), args.pop("kernel"), args.pop("targets"),
                            **args)
