"""Shared tiny setup for the trainer tests: a small decoder, synthetic grain data, a config."""

from __future__ import annotations

import grain
import numpy as np

from omni_jax.llm.config import LLMConfig
from omni_jax.train.model import DecoderLM
from omni_jax.train.trainer import default_config

SEQ, VOCAB = 16, 128


def tiny_llm(**kw) -> LLMConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                num_heads=4, num_kv_heads=2, max_position_embeddings=64)
    return LLMConfig(**{**base, **kw})


def tiny_model(**kw) -> DecoderLM:
    return DecoderLM(tiny_llm(**kw))


def make_example(tokens: np.ndarray, length: int) -> dict[str, np.ndarray]:
    seq = tokens.shape[0] - 1
    pos = np.arange(seq, dtype=np.int32)
    return {"input_ids": tokens[:-1], "targets": tokens[1:],
            "loss_mask": (pos < length).astype(np.int32),
            "segment_ids": np.ones(seq, np.int32), "positions": pos}


def synthetic_dataset(batch_size: int, num_examples: int = 64, seed: int = 0,
                      process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Deterministic shuffled, repeating stream of [batch, SEQ] int32 batches (this process's
    rows: every process_count-th example of the global order)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, size=(num_examples, SEQ + 1)).astype(np.int32)
    lengths = rng.integers(4, SEQ + 1, size=num_examples)
    ds = grain.MapDataset.range(num_examples).shuffle(seed=seed).repeat()
    ds = ds[process_index::process_count]
    ds = ds.map(lambda i: make_example(tokens[i], int(lengths[i])))
    return ds.batch(batch_size // process_count, drop_remainder=True)


def example_batch(batch_size: int) -> dict[str, np.ndarray]:
    return synthetic_dataset(batch_size)[0]


def tiny_config(**kw):
    c = default_config()
    c.batch_size = 8
    c.steps = 4
    c.mesh = {"data": 1}
    c.optim.lr = 1e-2
    c.optim.warmup_steps = 1
    c.log_every = 1
    c.progress_bar = False
    c.tensorboard = False
    c.peak_flops = 1e9
    c.update(kw)
    return c



def parity_config(**kw):
    """tiny_config for step-equivalence tests: no warmup, and Adam eps 1e-3 so that elements
    with near-zero gradients (e.g. the attention key bias, whose true gradient is 0) are not
    normalized from float noise into lr-sized steps (g / (|g| + eps) is then smooth in g)."""
    c = tiny_config(**kw)
    c.optim.update(warmup_steps=0, eps=1e-3)
    return c


def assert_params_close(actual, desired, atol: float = 1e-5) -> None:
    """Leaf-wise allclose, naming the parameter path on failure."""
    import jax

    from omni_jax.train.stages import path_str
    flat_a = jax.tree_util.tree_flatten_with_path(jax.device_get(actual))[0]
    flat_d = jax.tree.leaves(jax.device_get(desired))
    assert len(flat_a) == len(flat_d)
    for (path, a), d in zip(flat_a, flat_d):
        np.testing.assert_allclose(a, d, atol=atol, rtol=0, err_msg=path_str(path))
