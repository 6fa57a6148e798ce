"""Ola LGAP vs a direct NumPy transcription of the formula; ola_mlp projector and its layouts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from omni_jax.adapters.lgap import LGAP, LGAPConfig, OlaProjector, OlaProjectorConfig
from omni_jax.adapters.ola_layout import (
    OlaLayout,
    OlaLayoutConfig,
    image_num_tokens,
    video_num_tokens,
)

C_VIS, D = 10, 8


def _gelu(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def _lgap_numpy(x, p, k=2):
    """Loop over windows: s_i = W2 gelu(W1 [f_i; g]); softmax over i per channel; sum pi f."""
    x = np.asarray(x, np.float64)
    w1, b1 = np.asarray(p["w1"]["kernel"], np.float64), np.asarray(p["w1"]["bias"], np.float64)
    w2, b2 = np.asarray(p["w2"]["kernel"], np.float64), np.asarray(p["w2"]["bias"], np.float64)
    b, h, w, c = x.shape
    out = np.zeros((b, h // k, w // k, c))
    for n in range(b):
        for i in range(h // k):
            for j in range(w // k):
                f = [x[n, k * i + di, k * j + dj] for di in range(k) for dj in range(k)]
                g = np.mean(f, axis=0)
                s = np.stack([_gelu(np.concatenate([fi, g]) @ w1 + b1) @ w2 + b2 for fi in f])
                pi = np.exp(s - s.max(0)) / np.exp(s - s.max(0)).sum(0)  # per channel
                out[n, i, j] = np.sum(pi * np.stack(f), axis=0)
    return out


def _init(module, *args):
    return nn.meta.unbox(module.init(jax.random.key(0), *args))


@pytest.mark.parametrize("window,grid", [(2, (4, 6)), (3, (3, 6))])
def test_lgap_matches_numpy_formula(window, grid):
    m = LGAP(LGAPConfig(window=window, init_std=0.5))  # large init: non-uniform softmax
    x = jax.random.normal(jax.random.key(1), (2, *grid, D))
    params = _init(m, x)
    y = m.apply(params, x)
    assert y.shape == (2, grid[0] // window, grid[1] // window, D)
    np.testing.assert_allclose(np.asarray(y), _lgap_numpy(x, params["params"], window),
                               atol=1e-5)


def test_lgap_window_1_is_identity_and_odd_grid_errors():
    m = LGAP(LGAPConfig(window=1))
    x = jax.random.normal(jax.random.key(2), (1, 3, 5, D))
    np.testing.assert_allclose(np.asarray(m.apply(_init(m, x), x)), np.asarray(x), atol=1e-6)
    m2 = LGAP(LGAPConfig())
    with pytest.raises(ValueError, match=r"grid 3x4 is not divisible by the 2x2 window"):
        m2.init(jax.random.key(0), jnp.zeros((1, 3, 4, D)))
    with pytest.raises(ValueError, match=r"grid \[batch, h, w, channels\]"):
        m2.init(jax.random.key(0), jnp.zeros((1, 12, D)))


@pytest.fixture(scope="module")
def ola():
    m = OlaProjector(OlaProjectorConfig(out_dim=D, init_std=0.3))
    x = jax.random.normal(jax.random.key(3), (2, 4 * 6, C_VIS))
    x2 = jax.random.normal(jax.random.key(4), (2, 8 * 4, C_VIS))
    params = _init(m, x, (4, 6), x2, (8, 4))
    return m, params, x, x2


def _pool_numpy(params, x, grid):
    p = params["params"]
    h = np.asarray(x, np.float64).reshape(x.shape[0], *grid, -1)
    h = h @ np.asarray(p["proj1"]["kernel"]) + np.asarray(p["proj1"]["bias"])
    h = _gelu(_lgap_numpy(h, p["pooler"]))
    return h @ np.asarray(p["proj2"]["kernel"]) + np.asarray(p["proj2"]["bias"])


def test_ola_projector_two_view_layout(ola):
    m, params, x, x2 = ola
    y = np.asarray(m.apply(params, x, (4, 6), x2, (8, 4)))
    v = {k: np.asarray(a) for k, a in params["params"]["vectors"].items()}
    low, high = _pool_numpy(params, x, (4, 6)), _pool_numpy(params, x2, (8, 4))  # 2x3, 4x2
    n = m.num_tokens(4, 6, (8, 4))
    assert n == 1 + 2 * 4 + 1 + 4 * 3 + 1 == image_num_tokens((2, 3), (4, 2))
    assert y.shape == (2, n, D)
    expect = [v["image_begin"]]
    for r in range(2):
        expect += [*low[:, r].transpose(1, 0, 2), v["image_newline"]]
    expect.append(v["image_sep"])
    for r in range(4):
        expect += [*high[:, r].transpose(1, 0, 2), v["image_newline"]]
    expect.append(v["image_end"])
    ref = np.stack([np.broadcast_to(e, (2, D)) for e in expect], axis=1)
    np.testing.assert_allclose(y, ref, atol=1e-4)
    marks = [(0, "image_begin"), (4, "image_newline"), (9, "image_sep"), (n - 1, "image_end")]
    for i, name in marks:
        np.testing.assert_array_equal(y[:, i], np.broadcast_to(v[name], (2, D)))


def test_ola_projector_single_view_and_video(ola):
    m, params, x, _ = ola
    v = {k: np.asarray(a) for k, a in params["params"]["vectors"].items()}
    y = np.asarray(m.apply(params, x, (4, 6)))  # [BEGIN] 2 rows of (3 + NL) [END], no SEP
    assert y.shape == (2, m.num_tokens(4, 6), D) == (2, 10, D)
    np.testing.assert_array_equal(y[:, [4, 8]], np.broadcast_to(v["image_newline"], (2, 2, D)))
    np.testing.assert_array_equal(y[:, -1], np.broadcast_to(v["image_end"], (2, D)))
    frames = x.reshape(1, 2, 24, C_VIS)  # 1 video of 2 frames
    yv = np.asarray(m.apply(params, frames, (4, 6), method=OlaProjector.video))
    nv = m.video_num_tokens(2, 4, 6)
    assert nv == 2 + 2 * (2 * 4 + 1) == video_num_tokens(2, (2, 3)) and yv.shape == (1, nv, D)
    per_frame = _pool_numpy(params, x, (4, 6))
    assert [i for i in range(nv) if np.array_equal(yv[0, i], v["image_sep"])] == [9, 18]
    assert [i for i in range(nv) if np.array_equal(yv[0, i], v["image_newline"])] == [4, 8, 13, 17]
    np.testing.assert_allclose(yv[0, 10:13], per_frame[1, 0], atol=1e-4)  # frame 2, row 1
    assert np.array_equal(yv[0, 0], v["image_begin"]) and np.array_equal(yv[0, -1], v["image_end"])


def test_layout_without_vectors_and_errors(ola):
    m, params, x, x2 = ola
    raw = OlaProjector(OlaProjectorConfig(out_dim=D, init_std=0.3, layout=False))
    sub = {"params": {k: params["params"][k] for k in ("proj1", "pooler", "proj2")}}
    y = np.asarray(raw.apply(sub, x, (4, 6)))
    assert y.shape == (2, raw.num_tokens(4, 6), D) == (2, 6, D)
    np.testing.assert_allclose(y, _pool_numpy(params, x, (4, 6)).reshape(2, 6, D), atol=1e-4)
    with pytest.raises(ValueError, match="not divisible by the 2x2 window"):
        m.num_tokens(5, 6)
    with pytest.raises(ValueError, match="pass x2 and grid2_hw together"):
        m.apply(params, x, (4, 6), x2)
    with pytest.raises(ValueError, match=r"expected patch features \[batch, 4\*4=16"):
        m.apply(params, x, (4, 4))
    with pytest.raises(ValueError, match="num_frames must be a positive int"):
        video_num_tokens(0, (2, 2))
    with pytest.raises(ValueError, match=r"OlaProjectorConfig: unknown keys \['pool'\]"):
        OlaProjectorConfig.from_dict({"pool": 2})


def test_layout_vector_init_is_std_one_over_sqrt_d():
    d = 1024
    lay = OlaLayout(OlaLayoutConfig(dim=d))
    p = lay.init(jax.random.key(5), jnp.zeros((1, 1, 1, d)), method=OlaLayout.image)
    vecs = np.stack([np.asarray(a) for a in nn.meta.unbox(p)["params"].values()])
    assert vecs.shape == (4, d)
    assert abs(vecs.std() - d ** -0.5) < 0.1 * d ** -0.5  # var would give std d**-0.25 = 0.18
