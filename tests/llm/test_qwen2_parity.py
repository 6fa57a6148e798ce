"""Qwen2 decoder vs transformers' Qwen2ForCausalLM in fp32 on random tiny configs."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from omni_jax.convert.qwen2 import config_from_hf, params_from_hf
from omni_jax.layers.attention import init_cache
from omni_jax.llm import Decoder, LLMConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = {
    "gqa_untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mha_tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "mqa_untied_headdim": dict(num_attention_heads=4, num_key_value_heads=1,
                               tie_word_embeddings=False, head_dim=16),
}


def hf_model(seed: int = 0, **kw) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      max_position_embeddings=128, **kw)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # biases are zero at init: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def to_jax(model: Qwen2ForCausalLM, **overrides) -> tuple[LLMConfig, dict]:
    cfg = config_from_hf(model.config.to_dict(), **overrides)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return cfg, params_from_hf(cfg, state)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("scan", [False, True])
def test_logits_match_hf_with_padding(variant, scan):
    model = hf_model(**VARIANTS[variant])
    cfg, params = to_jax(model, scan_layers=scan)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, size=(2, 11))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # right padding in the second row
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    out = Decoder(cfg).apply(params, jnp.asarray(ids, jnp.int32),
                             segment_ids=jnp.asarray(mask, jnp.int32))
    got = np.asarray(out["logits"])
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], ref[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["gqa_untied", "mha_tied"])
def test_kv_cache_decoding_matches_full_forward(variant):
    model = hf_model(seed=1, **VARIANTS[variant])
    cfg, params = to_jax(model)
    dec = Decoder(cfg)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
    full = np.asarray(dec.apply(params, ids)["logits"])
    cache = init_cache(2, 16, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers)
    step = jax.jit(lambda p, x, c: dec.apply(p, x, cache=c))
    out = step(params, ids[:, :7], cache)
    got = [np.asarray(out["logits"])]
    cache = out["cache"]
    for t in range(7, 12):  # one token at a time
        out = step(params, ids[:, t:t + 1], cache)
        cache = out["cache"]
        got.append(np.asarray(out["logits"]))
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=1e-5, rtol=0)
    assert int(cache["index"]) == 12


def test_inputs_embeds_equal_token_path():
    model = hf_model(seed=2, **VARIANTS["gqa_untied"])
    cfg, params = to_jax(model)
    dec = Decoder(cfg)
    ids = jnp.arange(10, dtype=jnp.int32)[None] % cfg.vocab_size
    emb = dec.apply(params, ids, method=Decoder.embed_tokens)
    a = dec.apply(params, ids)["logits"]
    b = dec.apply(params, inputs_embeds=emb)["logits"]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kw, match", [
    (dict(hidden_size=30, num_heads=4), "not divisible by num_heads"),
    (dict(num_heads=4, num_kv_heads=3), "must divide num_heads"),
    (dict(remat_policy="sometimes"), "unknown remat_policy"),
    (dict(dtype="float8"), "unknown dtype"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        LLMConfig(**kw)


def test_bad_inputs():
    cfg = LLMConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_layers=1,
                    num_heads=2, num_kv_heads=1)
    dec = Decoder(cfg)
    params = dec.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"integer array \[batch, seq\]"):
        dec.apply(params, jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match=r"integer array \[batch, seq\]"):
        dec.apply(params, jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[batch, seq, 16\]"):
        dec.apply(params, inputs_embeds=jnp.zeros((1, 4, 8)))
    with pytest.raises(ValueError, match="exactly one of"):
        dec.apply(params)
