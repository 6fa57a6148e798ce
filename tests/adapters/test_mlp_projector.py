"""MLP projector (LLaVA / OpenOmni / Capybara 2x2 bilinear) vs torch, and the adapter registry."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omni_jax.adapters.mlp_projector import MLPProjector, MLPProjectorConfig
from omni_jax.adapters.registry import build_adapter, known_adapters

C, D = 12, 16


def _t(a) -> torch.Tensor:
    return torch.tensor(np.array(a))


def _init(module, x, grid):
    return nn.meta.unbox(module.init(jax.random.key(0), x, grid))


def _torch_mlp(params, x):
    """Linear -> exact GELU -> Linear in torch with the flax weights."""
    p = {k: _t(v) for k, v in
         {"w1": params["mlp"]["fc1"]["kernel"], "b1": params["mlp"]["fc1"]["bias"],
          "w2": params["mlp"]["fc2"]["kernel"], "b2": params["mlp"]["fc2"]["bias"]}.items()}
    h = F.gelu(x @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]


def test_bilinear_half_is_2x2_average_pool_in_torch():
    x = torch.randn(2, C, 8, 6)
    pooled = F.avg_pool2d(x, 2)
    for kw in ({"scale_factor": 0.5}, {"size": (4, 3)}):
        y = F.interpolate(x, mode="bilinear", align_corners=False, **kw)
        np.testing.assert_allclose(y.numpy(), pooled.numpy(), atol=1e-6)


@pytest.mark.parametrize("grid", [(8, 6), (5, 7)])
def test_reduce_2x2_projector_matches_torch(grid):
    gh, gw = grid
    m = MLPProjector(MLPProjectorConfig(out_dim=D, reduce_factor=2))
    x = jax.random.normal(jax.random.key(1), (2, gh * gw, C))
    params = _init(m, x, grid)
    y = m.apply(params, x, grid)
    assert y.shape == (2, m.num_tokens(gh, gw), D) == (2, (gh // 2) * (gw // 2), D)
    xt = _t(x).reshape(2, gh, gw, C).permute(0, 3, 1, 2)
    red = F.interpolate(xt, size=(gh // 2, gw // 2), mode="bilinear", align_corners=False)
    ref = _torch_mlp(params["params"], red.permute(0, 2, 3, 1).reshape(2, -1, C))
    np.testing.assert_allclose(np.asarray(y), ref.numpy(), atol=1e-4)


def test_plain_mlp_matches_torch_and_capybara_token_count():
    m = MLPProjector(MLPProjectorConfig(out_dim=D))
    x = jax.random.normal(jax.random.key(2), (1, 12, C))
    params = _init(m, x, (3, 4))
    y = m.apply(params, x, (3, 4))
    ref = _torch_mlp(params["params"], _t(x))
    np.testing.assert_allclose(np.asarray(y), ref.numpy(), atol=1e-4)
    capy = MLPProjector(MLPProjectorConfig(out_dim=D, reduce_factor=2))
    assert capy.num_tokens(32, 32) == 256 and m.num_tokens(32, 32) == 1024


@pytest.mark.parametrize("mode", ["row", "end"])
def test_image_newline_positions(mode):
    cfg = MLPProjectorConfig(out_dim=D, reduce_factor=2, newline=mode)
    m, plain = MLPProjector(cfg), MLPProjector(cfg.replace(newline="none"))
    x = jax.random.normal(jax.random.key(3), (2, 6 * 8, C))
    params = _init(m, x, (6, 8))
    y = np.asarray(m.apply(params, x, (6, 8)))
    base = np.asarray(plain.apply({"params": {"mlp": params["params"]["mlp"]}}, x, (6, 8)))
    nl = np.asarray(params["params"]["image_newline"])
    assert y.shape == (2, m.num_tokens(6, 8), D)
    if mode == "row":  # 3 rows of 4 tokens, each followed by the newline
        assert m.num_tokens(6, 8) == 3 * 5
        grid = y.reshape(2, 3, 5, D)
        np.testing.assert_array_equal(grid[:, :, 4], np.broadcast_to(nl, (2, 3, D)))
        np.testing.assert_array_equal(grid[:, :, :4].reshape(2, 12, D), base)
    else:
        assert m.num_tokens(6, 8) == 13
        np.testing.assert_array_equal(y[:, -1], np.broadcast_to(nl, (2, D)))
        np.testing.assert_array_equal(y[:, :-1], base)
    assert abs(float(np.std(nl)) - D ** -0.5) < 0.5 * D ** -0.5  # LLaVA init std 1/sqrt(D)


def test_mlp_errors():
    m = MLPProjector(MLPProjectorConfig(out_dim=D, reduce_factor=2))
    x = jnp.zeros((1, 10, C))
    with pytest.raises(ValueError, match=r"expected patch features \[batch, 3\*4=12"):
        m.init(jax.random.key(0), x, (3, 4))
    with pytest.raises(ValueError, match="grid_hw must be two positive static ints"):
        m.init(jax.random.key(0), x, (10,))
    with pytest.raises(ValueError, match="smaller than reduce_factor=2"):
        m.num_tokens(1, 8)
    with pytest.raises(ValueError, match=r"MLPProjectorConfig: unknown keys \['outdim'\]"):
        MLPProjectorConfig.from_dict({"outdim": 3})
    with pytest.raises(ValueError, match="newline: unknown value 'col'"):
        MLPProjectorConfig(newline="col")
    with pytest.raises(ValueError, match="reduce_method: unknown value 'nearest'"):
        MLPProjectorConfig(reduce_method="nearest")
    with pytest.raises(ValueError, match="out_dim must be positive"):
        MLPProjectorConfig(out_dim=0)


def test_registry_builds_and_rejects():
    assert {"mlp", "mlp_2x2", "ola_lgap", "ovis_vte", "highway"} <= set(known_adapters())
    m = build_adapter("mlp_2x2", {"out_dim": D})
    assert isinstance(m, MLPProjector) and m.config.reduce_factor == 2
    assert build_adapter("mlp", {"out_dim": D}).config.reduce_factor == 1
    with pytest.raises(ValueError, match=r"unknown adapter 'qformer'; known adapters: .*ola_lgap"):
        build_adapter("qformer", {})
    with pytest.raises(ValueError, match="implies reduce_factor=2"):
        build_adapter("mlp_2x2", {"reduce_factor": 1})
    with pytest.raises(ValueError, match="unknown keys"):
        build_adapter("ola_lgap", {"out_dim": D, "windw": 2})


@pytest.mark.parametrize("name", ["mlp", "mlp_2x2", "ola_lgap", "ovis_vte", "highway"])
def test_registry_num_tokens_matches_output(name):
    cfg = {"out_dim": D, **({"vocab_size": 24, "hidden_stride": 2} if name == "ovis_vte" else {})}
    m = build_adapter(name, cfg)
    grid = (4, 6)
    x = jnp.ones((2, 24, C))
    y = m.apply(m.init(jax.random.key(0), x, grid), x, grid)
    assert y.shape == (2, m.num_tokens(*grid), D)
