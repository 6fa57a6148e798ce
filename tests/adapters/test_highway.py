"""X-VILA visual embedding highway: shapes, and it bypasses the LLM (gradients say so)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.adapters.highway import HighwayConfig, HighwayOutput, VisualHighway, with_highway
from omni_jax.adapters.mlp_projector import MLPProjector, MLPProjectorConfig
from omni_jax.llm import Decoder, LLMConfig

C, D, DEC = 12, 32, 20
LLM = LLMConfig(vocab_size=64, hidden_size=D, intermediate_size=48, num_layers=1, num_heads=2,
                num_kv_heads=1)


class _AnyToAny(nn.Module):
    """Test harness: vision -> projector -> LLM (prefix), vision -> highway; both outputs."""

    @nn.compact
    def __call__(self, vision, ids):
        grid = (2, 3)
        llm = Decoder(LLM, name="llm")
        prefix = MLPProjector(MLPProjectorConfig(out_dim=D), name="projector")(vision, grid)
        text = llm.embed_tokens(ids)
        out = llm(inputs_embeds=jnp.concatenate([prefix, text], axis=1))
        veh = VisualHighway(HighwayConfig(out_dim=DEC), name="veh")(vision, grid)
        return with_highway(out, veh)


@pytest.mark.parametrize("hidden", [None, 24])
def test_highway_shapes(hidden):
    m = VisualHighway(HighwayConfig(out_dim=DEC, hidden_dim=hidden))
    x = jax.random.normal(jax.random.key(0), (3, 8, C))
    params = nn.meta.unbox(m.init(jax.random.key(1), x, (2, 4)))
    y = m.apply(params, x, (2, 4))
    assert y.shape == (3, m.num_tokens(2, 4), DEC) == (3, 8, DEC)
    names = set(params["params"])
    assert names == ({"proj"} if hidden is None else {"mlp"})
    if hidden is None:
        p = params["params"]["proj"]
        np.testing.assert_allclose(np.asarray(y), np.asarray(x) @ np.asarray(p["kernel"])
                                   + np.asarray(p["bias"]), atol=1e-5)
    else:
        assert params["params"]["mlp"]["fc1"]["kernel"].shape == (C, hidden)


def test_highway_bypasses_llm_but_depends_on_vision():
    model = _AnyToAny()
    vision = jax.random.normal(jax.random.key(2), (2, 6, C))
    ids = jnp.array([[1, 2, 3], [4, 5, 6]])
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(3), vision, ids))
    out = jax.jit(model.apply)(params, vision, ids)
    assert isinstance(out, HighwayOutput)
    assert out.highway.shape == (2, 6, DEC) and out.llm_hidden.shape == (2, 6 + 3, D)
    assert out.logits.shape == (2, 9, 64)
    w = jax.random.normal(jax.random.key(4), out.highway.shape)
    wl = jax.random.normal(jax.random.key(5), out.llm_hidden.shape)

    def highway_loss(p, v):
        return jnp.sum(model.apply(p, v, ids).highway * w)

    def llm_loss(p, v):
        return jnp.sum(model.apply(p, v, ids).llm_hidden * wl)

    grads = jax.jit(lambda p, v: (jax.grad(highway_loss, argnums=(0, 1))(p, v),
                                  jax.grad(llm_loss, argnums=(0, 1))(p, v)))
    (g_p, g_v), (g_p2, g_v2) = grads(params, vision)
    llm_grads = jax.tree.leaves(g_p["params"]["llm"])
    assert llm_grads and all(float(jnp.abs(g).max()) == 0.0 for g in llm_grads)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_p["params"]["projector"]))
    assert float(jnp.abs(g_v).max()) > 1e-4  # depends on the vision features
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_p2["params"]["llm"])) > 1e-4
    assert float(jnp.abs(g_v2).max()) > 1e-6  # the LLM also sees vision (through the projector)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_p2["params"]["veh"]))


def test_highway_errors():
    with pytest.raises(ValueError, match="HighwayConfig.hidden_dim must be positive"):
        HighwayConfig(hidden_dim=0)
    with pytest.raises(ValueError, match=r"HighwayConfig: unknown keys \['width'\]"):
        HighwayConfig.from_dict({"width": 3})
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        HighwayConfig(act="swish")
    m = VisualHighway(HighwayConfig(out_dim=DEC))
    with pytest.raises(ValueError, match=r"expected patch features \[batch, 2\*2=4"):
        m.init(jax.random.key(0), jnp.zeros((1, 5, C)), (2, 2))
    with pytest.raises(ValueError, match=r"highway must be \[batch=2"):
        with_highway({"hidden": jnp.zeros((2, 3, D))}, jnp.zeros((1, 4, DEC)))
