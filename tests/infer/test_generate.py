"""generate() vs transformers' greedy generate on a tiny random Qwen2, cache vs full forward."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from omni_jax.convert.qwen2 import config_from_hf, params_from_hf
from omni_jax.infer.generate import SamplingConfig, generate, sample_logits
from omni_jax.llm import Decoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
NEW = 8


@pytest.fixture(scope="module")
def tiny():
    """A tiny random HF Qwen2 (peaked logits so greedy ties cannot flip) and our copy."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      max_position_embeddings=40, tie_word_embeddings=False)
    hf = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    ours = config_from_hf(hf.config.to_dict())
    params = params_from_hf(ours, {k: v.numpy() for k, v in hf.state_dict().items()})
    return hf, Decoder(ours), params


def hf_greedy(hf, ids, mask, eos_id=None):
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          do_sample=False, max_new_tokens=NEW, min_new_tokens=0, pad_token_id=0,
                          eos_token_id=eos_id)
    return out[:, ids.shape[1]:].numpy()


def prompts():
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 96, size=(2, 7))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    ids[1, :3] = 0
    return ids, mask


def test_greedy_matches_hf_batch1(tiny):
    hf, model, params = tiny
    ids, mask = prompts()
    ids, mask = ids[:1], mask[:1]
    ref = hf_greedy(hf, ids, mask)
    got = generate(model, params, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=NEW)
    np.testing.assert_array_equal(np.asarray(got["tokens"]), ref)
    assert int(got["steps"]) == NEW


def test_greedy_matches_hf_left_padded_batch_with_eos(tiny):
    hf, model, params = tiny
    ids, mask = prompts()
    ref = hf_greedy(hf, ids, mask)
    got = generate(model, params, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=NEW)
    np.testing.assert_array_equal(np.asarray(got["tokens"]), ref)
    # EOS = row 0's third token: row 0 stops there (pads after), row 1 runs on unless it hits it.
    eos = int(ref[0, 2])
    ref_eos = hf_greedy(hf, ids, mask, eos_id=eos)
    got = generate(model, params, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=NEW,
                   eos_id=eos)
    toks = np.asarray(got["tokens"])
    np.testing.assert_array_equal(toks[:, :ref_eos.shape[1]], ref_eos)
    assert (toks[0, 3:] == 0).all() and bool(got["done"][0])


def test_right_padding_equals_unpadded_rows(tiny):
    _, model, params = tiny
    ids, mask = prompts()
    right_ids = np.zeros_like(ids)
    right_ids[0], right_ids[1, :4] = ids[0], ids[1, 3:]
    right_mask = (right_ids != 0).astype(np.int32)
    got = generate(model, params, jnp.asarray(right_ids), jnp.asarray(right_mask),
                   max_new_tokens=NEW)
    alone = generate(model, params, jnp.asarray(ids[1:, 3:]), None, max_new_tokens=NEW)
    np.testing.assert_array_equal(np.asarray(got["tokens"][1]), np.asarray(alone["tokens"][0]))


def test_cached_logits_equal_full_forward(tiny):
    _, model, params = tiny
    ids, mask = prompts()
    got = generate(model, params, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=NEW,
                   return_logits=True)
    full_ids = np.concatenate([ids, np.asarray(got["tokens"])], axis=1)
    full_mask = np.concatenate([mask, np.ones((2, NEW), mask.dtype)], axis=1)
    pos = np.maximum(np.cumsum(full_mask, -1) - 1, 0)
    # Full forward with the same padding: segment ids keep pads out, positions skip them.
    ref = model.apply(params, jnp.asarray(full_ids, jnp.int32), positions=jnp.asarray(pos),
                      segment_ids=jnp.asarray(full_mask, jnp.int32))["logits"]
    p = ids.shape[1]
    np.testing.assert_allclose(np.asarray(got["logits"]), np.asarray(ref[:, p - 1:-1]),
                               atol=1e-4, rtol=0)


def test_top_k1_sampling_equals_greedy(tiny):
    _, model, params = tiny
    ids, mask = prompts()
    greedy = generate(model, params, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=NEW)
    sampled = generate(model, params, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=NEW,
                       sampling=SamplingConfig(greedy=False, temperature=0.7, top_k=1),
                       rng=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(sampled["tokens"]), np.asarray(greedy["tokens"]))


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.split(jax.random.key(0), 1)[0]
    top2 = np.asarray(sample_logits(logits, keys, SamplingConfig(greedy=False, top_k=2)))
    assert set(top2.tolist()) == {0, 1}
    # top_p=0.8: tokens 0 and 1 (mass before token 2 is 0.8, not < 0.8) -> frequencies ~5:3.
    nuc = np.asarray(sample_logits(logits, keys, SamplingConfig(greedy=False, top_p=0.8)))
    assert set(nuc.tolist()) == {0, 1}
    assert abs((nuc == 0).mean() - 0.625) < 0.04


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
])
def test_sampling_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kw)
    with pytest.raises(ValueError, match="unknown keys"):
        SamplingConfig.from_dict({"topk": 1})


def test_generate_argument_errors(tiny):
    _, model, params = tiny
    ids = jnp.ones((1, 30), jnp.int32)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 40"):
        generate(model, params, ids, max_new_tokens=11)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        generate(model, params, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="attention_mask shape"):
        generate(model, params, ids, jnp.ones((1, 29)), max_new_tokens=2)
    with pytest.raises(ValueError, match="integer array"):
        generate(model, params, ids[0], max_new_tokens=2)
    with pytest.raises(ValueError, match="eos_id=96 is outside"):
        generate(model, params, ids, max_new_tokens=2, eos_id=96)
    with pytest.raises(ValueError, match="needs an rng"):
        generate(model, params, ids, max_new_tokens=2, sampling=SamplingConfig(greedy=False))


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 1), (4, 4)])
def test_fast_attention_matches_jax_nn(heads, kv_heads):
    """layers.attention.dot_product_attention (used in prefill/decode) == jax.nn's XLA path."""
    from omni_jax.layers.attention import causal_segment_mask, dot_product_attention

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 7, heads, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 9, kv_heads, 8)), jnp.float32) for _ in "kv")
    seg = jnp.asarray([[1] * 9, [1] * 5 + [0] * 4])
    masks = [None, causal_segment_mask(seg)[:, :, :7], jnp.zeros((2, 1, 7, 9), bool),
             jnp.asarray(rng.random((2, heads, 7, 9)) > 0.3)]
    for mask in masks:
        np.testing.assert_allclose(dot_product_attention(q, k, v, mask),
                                   jax.nn.dot_product_attention(q, k, v, mask=mask),
                                   atol=1e-6, rtol=0)
