"""grain pipeline: mixture weights, buckets, packing, exact resume, per-process sharding."""

import json
import shutil

import numpy as np
import pytest

from omni_jax.data import packing, sources
from omni_jax.data.fixtures import make_fixtures
from omni_jax.data.pipeline import DataConfig, SourceConfig, default_config, make_dataset


def _records(src, n, lo, hi, seed=0):
    rng = np.random.default_rng(seed + src)
    return [{"uid": src * 10_000 + i, "n": int(rng.integers(lo, hi + 1))} for i in range(n)]


def _encode(rec):
    """uid+1 first (so batches show which record a segment is), then n filler tokens."""
    n = rec["n"]
    ids = np.concatenate([[rec["uid"] + 1], 1 + np.arange(n) % 50]).astype(np.int32)
    return {"input_ids": ids, "loss_mask": np.ones(n + 1, np.int32)}


def _uids(batch):
    """uid of every example in a batch (first token of each segment)."""
    seg = batch["segment_ids"]
    starts = (seg > 0) & (batch["positions"] == 0)
    return (batch["input_ids"][starts] - 1).tolist()


def _config(weights, **kw):
    return DataConfig(sources={f"s{i}": SourceConfig(weight=w) for i, w in enumerate(weights)},
                      read_threads=kw.pop("read_threads", 0), **kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_mixture_proportions_match_weights():
    weights = (5.0, 3.0, 2.0)
    srcs = {f"s{i}": _records(i, m, 1, 10) for i, m in enumerate((400, 300, 200))}
    cfg = _config(weights, batch_size=8, seq_buckets=(16,))
    it = iter(make_dataset(cfg, _encode, sources=srcs, process_index=0, process_count=1))
    uids = [u for b in _take(it, 75) for u in _uids(b)]
    n = len(uids)
    assert n == 600
    counts = np.bincount(np.asarray(uids) // 10_000, minlength=3)
    m = it.metrics()
    assert [m[f"data/examples/s{i}"] for i in range(3)] == counts.tolist()
    p = np.asarray(weights) / sum(weights)
    bound = 5 * np.sqrt(n * p * (1 - p))  # 5 sigma of a multinomial count
    assert (np.abs(counts - n * p) <= bound).all(), (counts, n * p, bound)
    assert len(set(uids)) == n  # no record repeats within one pass of the smallest source


def test_buckets_give_only_configured_shapes_and_drop_overlong():
    recs = _records(0, 120, 1, 80)
    cfg = _config((1.0,), batch_size=4, seq_buckets=(16, 32, 64), num_epochs=1)
    it = iter(make_dataset(cfg, _encode, sources={"s0": recs}, process_index=0,
                           process_count=1))
    seen, shapes = [], set()
    for b in it:
        shapes.add(b["input_ids"].shape)
        assert set(b) == set(packing.BATCH_KEYS)
        assert all(v.dtype == np.int32 and v.shape == b["input_ids"].shape for v in b.values())
        lengths = (b["segment_ids"] > 0).sum(axis=1)
        assert b["input_ids"].shape[1] == packing.choose_bucket(lengths.max(), (16, 32, 64))
        seen += _uids(b)
    assert shapes <= {(4, 16), (4, 32), (4, 64)} and len(shapes) >= 2
    keep = sorted(r["uid"] for r in recs if r["n"] <= 64)  # training length = n
    assert sorted(seen) == keep
    assert it.metrics()["data/dropped_too_long"] == len(recs) - len(keep) > 0


def test_all_examples_too_long_fails_instead_of_hanging():
    """Every record longer than seq_len: a clear error after TOO_LONG_GRACE drops, not a loop
    that never yields (a repeating source would spin forever)."""
    from omni_jax.data.pipeline import TOO_LONG_GRACE

    recs = _records(0, 40, 100, 120)
    cfg = _config((1.0,), batch_size=4, seq_buckets=(16, 32, 64))  # repeats forever
    it = iter(make_dataset(cfg, _encode, sources={"s0": recs}, process_index=0,
                           process_count=1))
    with pytest.raises(ValueError, match=f"the first {TOO_LONG_GRACE} examples are all longer "
                                         "than seq_len=64"):
        next(it)


@pytest.mark.parametrize("use_packing", [False, True])
def test_iterator_state_resumes_exactly(use_packing):
    srcs = {"s0": _records(0, 50, 2, 40), "s1": _records(1, 30, 2, 40)}
    cfg = _config((2.0, 1.0), batch_size=4, seq_buckets=(16, 32, 48), packing=use_packing,
                  read_threads=2, seed=7)
    ds = make_dataset(cfg, _encode, sources=srcs, process_index=0, process_count=1)
    it = iter(ds)
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # checkpointed as JSON
    want, want_metrics = _take(it, 6), it.metrics()
    again = iter(make_dataset(cfg, _encode, sources=srcs, process_index=0, process_count=1))
    again.set_state(state)
    got = _take(again, 6)
    for w, g in zip(want, got):
        assert w.keys() == g.keys()
        for k in w:
            np.testing.assert_array_equal(w[k], g[k])
    assert again.metrics() == want_metrics
    if use_packing:
        assert all(b["input_ids"].shape == (4, 48) for b in want)
        assert max(b["segment_ids"].max() for b in want) >= 2


def test_processes_get_disjoint_shards_covering_the_data():
    srcs = {"s0": _records(0, 60, 2, 20), "s1": _records(1, 60, 2, 20)}
    cfg = _config((1.0, 1.0), batch_size=4, seq_buckets=(32,), packing=True, num_epochs=1)
    per_process = []
    for p in range(2):
        uids = []
        it = iter(make_dataset(cfg, _encode, sources=srcs, process_index=p, process_count=2))
        for b in it:
            assert b["input_ids"].shape == (2, 32)  # local share of the global batch
            uids += _uids(b)
        assert len(uids) == len(set(uids)) > 0
        # each process mixes both sources with the configured (equal) weights
        assert it.metrics()["data/examples/s0"] == it.metrics()["data/examples/s1"] == 30
        per_process.append(set(uids))
    assert not per_process[0] & per_process[1]
    assert per_process[0] | per_process[1] == {r["uid"] for s in srcs.values() for r in s}


def test_epochs_reshuffle_and_seed_changes_order():
    recs = _records(0, 24, 2, 6)

    def order(seed):
        cfg = _config((1.0,), batch_size=4, seq_buckets=(8,), num_epochs=2, seed=seed)
        return [u for b in make_dataset(cfg, _encode, sources={"s0": recs}, process_index=0,
                                        process_count=1) for u in _uids(b)]

    o = order(0)
    first, second = o[:24], o[24:]
    assert sorted(first) == sorted(second) == list(range(24))
    assert first != second and first != sorted(first)
    assert order(0) == o and order(1) != o


def _byte_encode(rec):
    """Byte-level encode of a ChatML record: media parts become one byte 1; answers are loss."""
    ids, mask = [], []
    for msg in rec["messages"]:
        parts = msg["content"] if isinstance(msg["content"], list) else [
            {"type": "text", "text": msg["content"]}]
        for part in parts:
            toks = list(part["text"].encode()) if part["type"] == "text" else [1]
            ids += toks
            mask += [int(msg["role"] == "assistant")] * len(toks)
    return {"input_ids": np.asarray(ids, np.int32), "loss_mask": np.asarray(mask, np.int32)}


def test_fixture_jsonl_and_tfds_mixture_from_config(tmp_path):
    man = make_fixtures(tmp_path / "fx", seed=1, num_images=6, num_audio=2, num_videos=1,
                        num_text=6)
    broken = tmp_path / "fx" / "captions_broken.jsonl"
    shutil.copy(man["image_caption"], broken)
    with open(broken, "a") as f:
        f.write('{"messages": [truncated\n')
    tfds_dir = sources.write_tfds({"train": sources.JsonlSource(man["text_chat"])},
                                  tmp_path / "tfds")
    c = default_config()
    c.sources.caps = {"kind": "jsonl", "path": str(broken), "weight": 2.0}
    c.sources.asr = {"kind": "jsonl", "path": [man["speech_asr"], man["video_qa"]]}
    c.sources.chat = {"kind": "tfds", "path": tfds_dir, "weight": 1.0}
    c.batch_size, c.seq_buckets, c.packing, c.read_threads = 4, (96,), True, 1
    it = iter(make_dataset(c, _byte_encode, process_index=0, process_count=1))
    batches = _take(it, 6)
    assert all(b["input_ids"].shape == (4, 96) for b in batches)
    m = it.metrics()
    assert m["data/corrupt_records"] == m["data/corrupt_records/caps"] == 1
    assert min(m[f"data/examples/{n}"] for n in ("caps", "asr", "chat")) > 0
    assert m["data/examples"] == sum(len(_uids(b)) for b in batches)
    assert 0.5 < m["data/token_fraction"] <= 1.0
    # answers are supervised: some targets count, and never across a segment boundary
    for b in batches:
        assert b["loss_mask"].sum() > 0
        assert (b["loss_mask"][b["segment_ids"] == 0] == 0).all()


@pytest.mark.parametrize("change, match", [
    ({"bogus": 1}, "DataConfig: unknown keys \\['bogus'\\]"),
    ({"seq_buckets": (64, 32)}, "strictly ascending"),
    ({"batch_size": 0}, "batch_size must be positive"),
    ({"num_epochs": 0}, "num_epochs must be positive"),
    ({"sources": {"a": {"kind": "parquet"}}}, "kind must be one of"),
    ({"sources": {"a": {"weight": 0.0}}}, "weight must be positive"),
    ({"sources": {"a": {"wieght": 1.0}}}, "SourceConfig: unknown keys \\['wieght'\\]"),
])
def test_bad_config_is_rejected(change, match):
    with pytest.raises(ValueError, match=match):
        DataConfig.from_dict({**{"sources": {"a": {}}}, **change})


def test_bad_pipeline_arguments_are_rejected():
    srcs = {"s0": _records(0, 8, 2, 4)}
    kw = {"sources": srcs, "process_index": 0, "process_count": 1}
    with pytest.raises(ValueError, match="config.sources is empty"):
        make_dataset(DataConfig(), _encode, **kw)
    with pytest.raises(ValueError, match="do not match config.sources"):
        make_dataset(_config((1.0, 1.0)), _encode, **kw)
    with pytest.raises(ValueError, match="batch_size 6 is not divisible by process_count 4"):
        make_dataset(_config((1.0,), batch_size=6, packing=True), _encode, sources=srcs,
                     process_index=0, process_count=4)
    with pytest.raises(ValueError, match="3 seq_buckets with 2 processes"):
        make_dataset(_config((1.0,), batch_size=4), _encode, sources=srcs, process_index=1,
                     process_count=2)
    with pytest.raises(ValueError, match="source 's0' has no records"):
        make_dataset(_config((1.0,)), _encode, sources={"s0": []}, process_index=0,
                     process_count=1)
    with pytest.raises(ValueError, match="a jsonl source needs a path"):
        make_dataset(_config((1.0,)), _encode, process_index=0, process_count=1)
