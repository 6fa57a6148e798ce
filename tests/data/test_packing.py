"""Shifting, bucketed padding and first-fit packing; packed == unpacked per-example losses."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from omni_jax.data import packing
from omni_jax.llm import Decoder, LLMConfig


def _examples(rng, n, lo, hi, vocab=64):
    out = []
    for i in range(n):
        length = int(rng.integers(lo, hi + 1))
        ids = rng.integers(1, vocab, size=length).astype(np.int32)
        mask = (rng.random(length) < 0.6).astype(np.int32)
        item = np.full(length, -1, np.int32)
        item[: min(2, length)] = i  # a marker per example, to check extras travel along
        out.append(packing.shift_example({"input_ids": ids, "loss_mask": mask,
                                          "item_index": item}))
    return out


def test_shift_example_aligns_targets_and_masks():
    ids = np.array([5, 6, 7, 8], np.int32)
    ex = packing.shift_example({"input_ids": ids, "loss_mask": np.array([0, 0, 1, 1]),
                                "modality": np.array([1, 1, 0, 0])})
    np.testing.assert_array_equal(ex["input_ids"], [5, 6, 7])
    np.testing.assert_array_equal(ex["targets"], [6, 7, 8])
    np.testing.assert_array_equal(ex["loss_mask"], [0, 1, 1])
    np.testing.assert_array_equal(ex["modality"], [1, 1, 0])
    assert all(v.dtype == np.int32 for v in ex.values())


@pytest.mark.parametrize("bad, match", [
    ({"input_ids": np.arange(4)}, "lacks \\['loss_mask'\\]"),
    ({"input_ids": np.arange(4), "loss_mask": np.ones(3, np.int32)}, "same length"),
    ({"input_ids": np.arange(4.0), "loss_mask": np.ones(4, np.int32)}, "integer array"),
    ({"input_ids": np.arange(1), "loss_mask": np.ones(1, np.int32)}, "at least 2 tokens"),
])
def test_shift_example_rejects_bad_encodings(bad, match):
    with pytest.raises(ValueError, match=match):
        packing.shift_example(bad)


def test_pad_batch_picks_smallest_bucket_and_pads():
    rng = np.random.default_rng(0)
    exs = _examples(rng, 3, 5, 20)
    longest = max(packing.example_length(e) for e in exs)
    batch = packing.pad_batch(exs, 4, (8, 16, 32), pad_id=3, pad_values={"item_index": -1})
    want = 8 if longest <= 8 else 16 if longest <= 16 else 32
    assert set(batch) == {*packing.BATCH_KEYS, "item_index"}
    assert all(v.shape == (4, want) and v.dtype == np.int32 for v in batch.values())
    for r, ex in enumerate(exs):
        n = packing.example_length(ex)
        np.testing.assert_array_equal(batch["targets"][r, :n], ex["targets"])
        np.testing.assert_array_equal(batch["positions"][r, :n], np.arange(n))
        assert (batch["segment_ids"][r, :n] == 1).all() and (batch["segment_ids"][r, n:] == 0).all()
        assert (batch["input_ids"][r, n:] == 3).all() and (batch["item_index"][r, n:] == -1).all()
    assert (batch["segment_ids"][3] == 0).all()  # missing row is all padding
    with pytest.raises(ValueError, match="exceeds the largest bucket 32"):
        packing.pad_batch(_examples(rng, 1, 40, 40), 4, (8, 16, 32))


def test_packing_keeps_every_token_once_with_resets():
    rng = np.random.default_rng(1)
    exs = _examples(rng, 40, 2, 30)
    batches = packing.pack_examples(exs, batch_size=3, seq_len=32, pad_values={"item_index": -1})
    seen = []
    for b in batches:
        assert all(v.shape == (3, 32) for v in b.values())
        for r in range(3):
            seg = b["segment_ids"][r]
            k = seg.max()
            real = seg > 0
            # segments are 1..k, contiguous, left-aligned, padding only at the end
            assert (seg[real] == np.repeat(np.arange(1, k + 1), np.bincount(seg[real])[1:])).all()
            assert real.sum() == 0 or real[: real.sum()].all()
            for s in range(1, k + 1):
                sl = seg == s
                n = int(sl.sum())
                np.testing.assert_array_equal(b["positions"][r, sl], np.arange(n))
                seen.append({k2: b[k2][r, sl] for k2 in ("input_ids", "targets", "loss_mask",
                                                          "item_index")})
            assert (b["loss_mask"][r, ~real] == 0).all() and (b["item_index"][r, ~real] == -1).all()
    assert len(seen) == len(exs)
    # every example appears exactly once, tokens, targets and masks intact (order may change)
    by_marker = {int(s["item_index"][0]): s for s in seen}
    assert sorted(by_marker) == list(range(len(exs)))
    for i, ex in enumerate(exs):
        got = by_marker[i]
        for k2 in got:
            np.testing.assert_array_equal(got[k2], ex[k2])
    tokens = sum(packing.example_length(e) for e in exs)
    assert tokens == sum(int((b["segment_ids"] > 0).sum()) for b in batches)


def test_first_fit_fills_earlier_rows_first():
    mk = lambda n: packing.shift_example({"input_ids": np.arange(n + 1) + 1,
                                          "loss_mask": np.ones(n + 1, np.int32)})
    p = packing.FirstFitPacker(batch_size=2, seq_len=10)
    assert p.add(mk(6)) and p.add(mk(6)) and p.add(mk(4)) and p.add(mk(4))
    assert not p.add(mk(1))  # rows are full: 6+4, 6+4
    b = p.emit()
    np.testing.assert_array_equal(b["segment_ids"], [[1] * 6 + [2] * 4, [1] * 6 + [2] * 4])
    assert p.empty
    with pytest.raises(ValueError, match="exceeds seq_len 10"):
        p.add(mk(11))


@pytest.fixture(scope="module")
def tiny_lm():
    cfg = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2)
    model = Decoder(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32))["params"]
    return model, params


def _token_ce(model, params, batch):
    """Masked per-token CE [batch, seq]; default positions / one segment when not packed."""
    ids = jnp.asarray(batch["input_ids"])
    pos = batch.get("positions", np.broadcast_to(np.arange(ids.shape[1]), ids.shape))
    seg = batch.get("segment_ids", np.ones(ids.shape, np.int32))
    return np.asarray(_ce_fn(model)(params, ids, jnp.asarray(batch["targets"]),
                                    jnp.asarray(batch["loss_mask"]), jnp.asarray(pos),
                                    jnp.asarray(seg)))


_CE = {}


def _ce_fn(model):
    if model not in _CE:
        def ce(params, ids, targets, mask, positions, segment_ids):
            out = model.apply({"params": params}, ids, positions=positions,
                              segment_ids=segment_ids)
            return optax.softmax_cross_entropy_with_integer_labels(out["logits"],
                                                                   targets) * mask
        _CE[model] = jax.jit(ce)
    return _CE[model]


def test_packed_batch_gives_same_per_example_losses_as_unpacked(tiny_lm):
    model, params = tiny_lm
    rng = np.random.default_rng(2)
    exs = _examples(rng, 7, 3, 14)
    batches = packing.pack_examples(exs, batch_size=2, seq_len=24)
    got, leak = {}, 0.0
    for batch in batches:
        assert (batch["segment_ids"].max(axis=1) >= 2).any()  # really packed
        packed = _token_ce(model, params, batch)
        for r in range(2):
            for s in range(1, batch["segment_ids"][r].max() + 1):
                sl = batch["segment_ids"][r] == s
                got[tuple(batch["input_ids"][r, sl])] = packed[r, sl].sum()
        # without segment ids / position resets the same rows give different losses
        plain = _token_ce(model, params, {k: batch[k] for k in ("input_ids", "targets",
                                                                "loss_mask")})
        leak = max(leak, float(np.abs(plain - packed).max()))
    assert leak > 1e-3
    assert len(got) == len(exs)
    # each example alone: one row each, trailing junk after it (causal: cannot affect it)
    alone = {k: np.full((len(exs), 24), 7, np.int32) for k in ("input_ids", "targets")}
    alone["loss_mask"] = np.zeros((len(exs), 24), np.int32)
    for r, ex in enumerate(exs):
        n = packing.example_length(ex)
        for k in alone:
            alone[k][r, :n] = ex[k]
    ce_alone = _token_ce(model, params, alone).sum(axis=1)
    for r, ex in enumerate(exs):
        assert ce_alone[r] > 0
        np.testing.assert_allclose(got[tuple(ex["input_ids"])], ce_alone[r], rtol=0, atol=1e-5)
