"""Ovis visual tokenizer head + VTE vs transformers' ovis2 (tiny random config, fp32).

Matched: Ovis2VisionModel's head (hidden_stride merge, head_linear, head_norm, softmax /
st_argmax) fed with the same backbone features (Ovis2VisionTransformer's normed output), and
Ovis2Model.get_image_features (zero indicator columns, VTE, indicator embeddings). The ViT
backbone itself runs in torch only.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.adapters.ovis_vte import (
    OvisVisualTokenizer,
    OvisVTEConfig,
    hidden_stride_merge,
    llm_embedding_stats,
)

os.environ["HF_HUB_OFFLINE"] = "1"
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V, K, D, C_VIT = 24, 5, 16, 16


def _hf_model(stride: int):
    vc = dict(hidden_size=C_VIT, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              image_size=16, patch_size=4, vocab_size=V, hidden_stride=stride,
              num_visual_indicator_tokens=K)
    tc = dict(model_type="qwen2", vocab_size=64, hidden_size=D, intermediate_size=32,
              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    cfg = transformers.Ovis2Config(vision_config=vc, text_config=tc, hidden_size=D, vocab_size=64)
    torch.manual_seed(stride)
    model = transformers.Ovis2Model(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine
        model.vision_tower.head_norm.weight.normal_(1.0, 0.3)
        model.vision_tower.head_norm.bias.normal_(0.0, 0.3)
    return model


def _params(model) -> dict:
    vt = model.vision_tower
    a = lambda t: jnp.asarray(t.detach().numpy())  # noqa: E731
    return {"params": {"head_linear": {"kernel": a(vt.head_linear.weight).T},
                       "head_norm": {"scale": a(vt.head_norm.weight), "bias": a(vt.head_norm.bias)},
                       "vte": {"embedding": a(model.visual_embeddings_table.weight)}}}


@pytest.fixture(scope="module", params=[1, 2])
def ref(request):
    stride = request.param
    model = _hf_model(stride)
    px = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = model.vision_tower.transformer(px).last_hidden_state  # [2, 16, C_VIT]
        out = {}
        for fn in ("softmax", "st_argmax"):
            model.vision_tower.config.tokenize_function = fn
            io = model.get_image_features(px)
            probs = model.vision_tower(px).pooler_output
            out[fn] = (probs.numpy(), io.pooler_output.numpy())
        indicators = io.visual_indicator_features.numpy()
    return stride, model, jnp.asarray(feats.numpy()), out, indicators


@pytest.mark.parametrize("fn", ["softmax", "st_argmax"])
def test_probabilities_and_embeddings_match_transformers(ref, fn):
    stride, model, feats, out, indicators = ref
    cfg = OvisVTEConfig(out_dim=D, vocab_size=V, num_visual_indicator_tokens=K,
                        hidden_stride=stride, tokenize_function=fn)
    m = OvisVisualTokenizer(cfg)
    params = _params(model)
    probs = np.asarray(m.apply(params, feats, (4, 4), method=OvisVisualTokenizer.probabilities))
    n = m.num_tokens(4, 4)
    assert n == 16 // stride ** 2 and probs.shape == (2, n, V)
    hf_probs, hf_emb = out[fn]
    np.testing.assert_allclose(probs[..., :V - K], hf_probs, atol=1e-4)
    np.testing.assert_array_equal(probs[..., V - K:], 0.0)
    emb = np.asarray(m.apply(params, feats, (4, 4)))
    np.testing.assert_allclose(emb, hf_emb, atol=1e-4)
    ind = np.asarray(m.apply(params, method=OvisVisualTokenizer.indicator_embeddings))
    np.testing.assert_allclose(ind, indicators, atol=1e-6)
    if fn == "st_argmax":
        np.testing.assert_array_equal(probs.sum(-1), 1.0)
        assert set(np.unique(probs)) == {0.0, 1.0}


def test_stride_merge_pads_odd_grid_like_ovis():
    x = np.arange(2 * 15 * 3, dtype=np.float32).reshape(2, 15, 3)  # grid 5x3, stride 2
    y = np.asarray(hidden_stride_merge(jnp.asarray(x), (5, 3), 2))
    assert y.shape == (2, 3 * 2, 4 * 3)
    grid = np.zeros((2, 6, 4, 3), np.float32)
    grid[:, :5, :3] = x.reshape(2, 5, 3, 3)
    for i in range(3):
        for j in range(2):
            cells = [grid[:, 2 * i + di, 2 * j + dj] for di in (0, 1) for dj in (0, 1)]
            want = np.concatenate(cells, axis=-1)
            np.testing.assert_array_equal(y[:, i * 2 + j], want)
    m = OvisVisualTokenizer(OvisVTEConfig(out_dim=D, vocab_size=V, hidden_stride=2))
    assert m.num_tokens(5, 3) == 6


@pytest.fixture(scope="module")
def gumbel():
    m = OvisVisualTokenizer(OvisVTEConfig(out_dim=D, vocab_size=V, num_visual_indicator_tokens=K,
                                          tokenize_function="gumbel_argmax"))
    x = jax.random.normal(jax.random.key(0), (2, 9, C_VIT))
    params = nn.meta.unbox(m.init({"params": jax.random.key(1), "gumbel": jax.random.key(2)},
                                  x, (3, 3)))
    return m, params, x


def test_gumbel_hard_is_one_hot_and_random(gumbel):
    m, params, x = gumbel
    probs = lambda key, tau=None: np.asarray(m.apply(  # noqa: E731
        params, x, (3, 3), tau, method=OvisVisualTokenizer.probabilities, rngs={"gumbel": key}))
    p1, p2 = probs(jax.random.key(3)), probs(jax.random.key(4))
    for p in (p1, p2):
        assert set(np.unique(p)) == {0.0, 1.0}
        np.testing.assert_array_equal(p.sum(-1), 1.0)
        np.testing.assert_array_equal(p[..., V - K:], 0.0)
    assert not np.array_equal(p1, p2)  # the noise changes the draws
    np.testing.assert_array_equal(probs(jax.random.key(3)), p1)
    emb = np.asarray(m.apply(params, x, (3, 3), rngs={"gumbel": jax.random.key(3)}))
    table = np.asarray(params["params"]["vte"]["embedding"])
    np.testing.assert_allclose(emb, table[p1.argmax(-1)], atol=1e-6)  # one-hot rows of the VTE


def test_gumbel_gradients_flow_straight_through(gumbel):
    m, params, x = gumbel
    w = jax.random.normal(jax.random.key(5), (2, 9, D))

    def loss(p, feats, tau):
        y = m.apply(p, feats, (3, 3), tau, rngs={"gumbel": jax.random.key(6)})
        return jnp.sum(y * w)

    g_params, g_x = jax.grad(loss, argnums=(0, 1))(params, x, 0.5)
    g_head = np.asarray(g_params["params"]["head_linear"]["kernel"])
    assert np.all(np.isfinite(g_head)) and np.abs(g_head).max() > 1e-6
    assert np.abs(np.asarray(g_x)).max() > 1e-6
    g_table = np.asarray(g_params["params"]["vte"]["embedding"])
    assert np.abs(g_table[:V - K]).max() > 0 and np.abs(g_table[V - K:]).max() == 0


def test_int_lookup_and_llm_stats_init():
    llm_emb = np.random.default_rng(0).normal(0.3, 0.05, (500, D)).astype(np.float32)
    stats = llm_embedding_stats(llm_emb)
    cfg = OvisVTEConfig.from_dict({"out_dim": D, "vocab_size": 4096, **stats})
    m = OvisVisualTokenizer(cfg)
    ids = jnp.array([[0, 7, 4095]])
    params = nn.meta.unbox(m.init(jax.random.key(0), ids, method=OvisVisualTokenizer.embed))
    table = np.asarray(params["params"]["vte"]["embedding"])
    assert abs(table.mean() - stats["vte_mean"]) < 0.01 and abs(table.std() - 0.05) < 0.005
    looked = np.asarray(m.apply(params, ids, method=OvisVisualTokenizer.embed))
    onehot = jax.nn.one_hot(ids, 4096)
    np.testing.assert_allclose(looked, m.apply(params, onehot, method=OvisVisualTokenizer.embed),
                               atol=1e-6)
    np.testing.assert_array_equal(looked[0], table[[0, 7, 4095]])


def test_ovis_errors():
    with pytest.raises(ValueError, match=r"indicator_tokens must be in \[0, vocab_size=8"):
        OvisVTEConfig(vocab_size=8, num_visual_indicator_tokens=8)
    with pytest.raises(ValueError, match="tokenize_function: unknown value 'argmax'"):
        OvisVTEConfig(tokenize_function="argmax")
    with pytest.raises(ValueError, match=r"OvisVTEConfig: unknown keys \['vocab'\]"):
        OvisVTEConfig.from_dict({"vocab": 3})
    m = OvisVisualTokenizer(OvisVTEConfig(out_dim=D, vocab_size=V))
    params = m.init(jax.random.key(0), jnp.zeros((1, 4, C_VIT)), (2, 2))
    with pytest.raises(ValueError, match="probabilities must have 24 columns"):
        m.apply(params, jnp.zeros((1, 3, V - 1)), method=OvisVisualTokenizer.embed)
    with pytest.raises(ValueError, match=r"expected patch features \[batch, 2\*3=6"):
        m.apply(params, jnp.zeros((1, 4, C_VIT)), (2, 3))
