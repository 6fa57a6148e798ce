"""Speech-unit decoding: CTC greedy vs a pure-python reference (both collapse modes); AR
sampling with the KV cache: greedy = a no-cache argmax loop over the teacher-forced forward with
per-item EOS stops, repetition-aware sampling on a rigged distribution, determinism, top_k=1 =
greedy; bad arguments."""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.speech.config import speech_preset
from omni_jax.speech.decode import ar_sample, ctc_greedy
from omni_jax.speech.generator import SpeechGenerator

H = 24


def ctc_reference(best, n, blank, collapse):
    out, prev = [], None
    for a in best[:n]:
        if a != blank and not (collapse and a == prev):
            out.append(int(a))
        prev = a
    return out


def one_hot_log_probs(paths, t, v1):
    lp = np.full((len(paths), t, v1), -5.0, np.float32)
    for b, p in enumerate(paths):
        lp[b, np.arange(len(p)), p] = 0.0
    return lp


def test_ctc_greedy_matches_reference():
    blank = 4  # V = 4 units + blank
    paths = [[1, 1, 4, 1, 2, 2, 4, 4, 3, 3], [4, 4, 0, 0, 0, 4, 0], [4, 4, 4], [2, 3, 3, 1]]
    lens = [10, 7, 3, 2]  # item 3: frames past 2 are padding (their argmax must not count)
    lp = one_hot_log_probs(paths, 10, 5)
    mask = np.arange(10)[None] < np.asarray(lens)[:, None]
    std = ctc_greedy(lp, mask)
    keep = ctc_greedy(lp, mask, collapse_repeats=False)
    assert [u.tolist() for u in std] == [[1, 1, 2, 3], [0, 0], [], [2, 3]]
    assert [u.tolist() for u in keep] == [[1, 1, 1, 2, 2, 3, 3], [0, 0, 0, 0], [], [2, 3]]
    rng = np.random.default_rng(0)  # random peaked log-probs, random lengths, blank = 0 too
    lp = rng.normal(size=(5, 30, 6)).astype(np.float32) * 3
    lens = rng.integers(0, 31, 5)
    mask = np.arange(30)[None] < lens[:, None]
    for blank_id in (None, 0):
        blank = 5 if blank_id is None else 0
        for collapse in (True, False):
            got = ctc_greedy(lp, mask, blank=blank_id, collapse_repeats=collapse)
            want = [ctc_reference(lp[b].argmax(-1), lens[b], blank, collapse) for b in range(5)]
            assert [g.tolist() for g in got] == want and all(g.dtype == np.int32 for g in got)
    assert sum(len(w) for w in want) > 20


def ar_setup(seed=0, head_scale=10.0):
    cfg = speech_preset("tiny", H, "ar")
    gen = SpeechGenerator(cfg)
    dummy = (jnp.zeros((1, 4, H)), jnp.ones((1, 4), bool), jnp.ones((1, 2), jnp.int32),
             jnp.ones((1, 2), bool), jnp.ones((1, 3), jnp.int32), jnp.ones((1, 3), bool))
    params = nn.unbox(jax.jit(gen.init)(jax.random.key(seed), *dummy))["params"]
    head = params["llm_decoder"]  # peaked logits: no near-ties between cache / no cache
    params = {**params, "llm_decoder": {**head, "kernel": head["kernel"] * head_scale}}
    rng = np.random.default_rng(seed)
    b, r, s = 2, 9, 6
    row_mask = np.zeros((b, r), bool)
    row_mask[0, :9], row_mask[1, [0, 2, 3, 5]] = True, True
    batch = dict(hidden=rng.standard_normal((b, r, H)).astype(np.float32), row_mask=row_mask,
                 text_ids=rng.integers(0, cfg.decoder.vocab_size, (b, s)).astype(np.int32),
                 text_mask=np.arange(s)[None] < np.array([[6], [3]]))
    return cfg, gen, params, batch


def with_eos_bias(params, delta):
    head = params["llm_decoder"]
    return {**params, "llm_decoder": {**head, "bias": head["bias"].at[-1].add(delta)}}


def reference_greedy(cfg, gen, params, batch, m):
    """No cache: each step runs the full teacher-forced `ar` on the units so far -> argmax."""
    fwd = jax.jit(partial(gen.apply, method=SpeechGenerator.ar))
    b = batch["hidden"].shape[0]
    s = batch["text_mask"].sum(1)
    units, lengths = np.full((b, m), cfg.unit_vocab, np.int32), np.zeros(b, np.int32)
    done, logits_path = np.zeros(b, bool), np.zeros((b, m, cfg.num_outputs), np.float32)
    for k in range(m):
        out = fwd({"params": params}, batch["hidden"], batch["row_mask"], batch["text_ids"],
                  batch["text_mask"], units, np.arange(m)[None] < lengths[:, None])
        logits = np.asarray(out["speech_ar_logits"])[np.arange(b), s + 1 + lengths]
        logits_path[:, k] = logits
        nxt = logits.argmax(-1)
        for i in range(b):
            if not done[i] and nxt[i] != cfg.unit_vocab:
                units[i, k], lengths[i] = nxt[i], lengths[i] + 1
            else:
                done[i] = True
    return units, lengths, logits_path


def test_ar_greedy_equals_full_forward_loop_with_per_item_eos():
    cfg, gen, params, batch = ar_setup(1)
    m, v = 12, cfg.unit_vocab
    # the greedy path without EOS, and each step's margin of the best unit over EOS
    _, _, path = reference_greedy(cfg, gen, with_eos_bias(params, -1e4), batch, m)
    margin = path[..., :v].max(-1) - (path[..., v] + 1e4)  # [b, m], with the original bias
    # an EOS bias shift that stops the items at different steps (>= 1 unit each)
    stops = lambda d: [int(np.argmax(np.r_[margin[i] < d, True])) for i in range(2)]  # noqa
    ok = [d for d in np.sort(margin.ravel()) + 1e-3
          if stops(d)[0] != stops(d)[1] and min(stops(d)) >= 1]
    delta = next((d for d in ok if max(stops(d)) < m), ok[0])
    rigged = with_eos_bias(params, float(delta))
    want_u, want_n, _ = reference_greedy(cfg, gen, rigged, batch, m)
    units, lengths = ar_sample(gen, {"params": rigged}, *batch.values(), max_units=m,
                               greedy=True)
    print(f"greedy lengths {lengths.tolist()} (max {m}), eos shift {delta:.3f}")
    np.testing.assert_array_equal(lengths, want_n)
    np.testing.assert_array_equal(units, want_u)
    assert lengths.tolist() == stops(delta) and lengths[0] != lengths[1] and min(lengths) < m
    assert (units[np.arange(m)[None] >= lengths[:, None]] == v).all()  # EOS padding
    assert len(np.unique(units[0, :lengths[0]])) > 1 or lengths[0] == 1
    # without EOS boost the same cached loop runs to max_units and still equals the reference
    free_u, free_n, _ = reference_greedy(cfg, gen, params, batch, m)
    got_u, got_n = ar_sample(gen, {"params": params}, *batch.values(), max_units=m, greedy=True)
    np.testing.assert_array_equal(got_u, free_u)
    np.testing.assert_array_equal(got_n, free_n)
    # top_k = 1 without the repetition check is greedy sampling
    k1_u, k1_n = ar_sample(gen, {"params": params}, *batch.values(), max_units=m,
                           rng=jax.random.key(3), top_k=1, window=0)
    np.testing.assert_array_equal(k1_u, got_u)
    np.testing.assert_array_equal(k1_n, got_n)


def rigged_params(cfg, params, p_top=0.6, top=3):
    """Input-independent logits: unit `top` has probability p_top, the others share the rest,
    EOS never."""
    v1 = cfg.num_outputs
    p = np.full(v1, (1 - p_top) / (v1 - 2))
    p[top], p[-1] = p_top, 1e-30
    head = params["llm_decoder"]
    return {**params, "llm_decoder": {"kernel": jnp.zeros_like(head["kernel"]),
                                      "bias": jnp.asarray(np.log(p), jnp.float32)}}


def longest_run(row, value):
    best = cur = 0
    for u in row:
        cur = cur + 1 if u == value else 0
        best = max(best, cur)
    return best


def test_repetition_aware_sampling():
    cfg, gen, params, _ = ar_setup(2)
    rig = {"params": rigged_params(cfg, params)}
    rng = np.random.default_rng(2)
    b, m = 4, 64
    batch = dict(hidden=rng.standard_normal((b, 5, H)).astype(np.float32),
                 row_mask=np.ones((b, 5), bool), text_ids=np.ones((b, 4), np.int32),
                 text_mask=np.ones((b, 4), bool))
    run = partial(ar_sample, gen, rig, *batch.values(), max_units=m, top_p=0.5)
    plain, n_plain = run(rng=jax.random.key(0), window=0)  # nucleus = {3}: always 3
    assert (plain == 3).all() and (n_plain == m).all()
    ras, n_ras = run(rng=jax.random.key(0), window=10, tau_r=0.1)  # any repeat -> full dist
    frac = float((ras == 3).mean())
    runs = [longest_run(r, 3) for r in ras]
    print(f"RAS: unit-3 fraction {frac:.2f} (plain 1.00), longest runs {runs} (plain {m})")
    assert (n_ras == m).all() and (ras[:, 0] == 3).all()  # no history yet: the nucleus unit
    assert 0.4 < frac < 0.8 and max(runs) < 20
    assert len(np.unique(ras)) > 10  # fallback draws from the whole distribution
    half, _ = run(rng=jax.random.key(0), window=10, tau_r=0.5)  # redraw at >= 5 repeats
    assert (half[:, :5] == 3).all()
    for i in range(b):  # a unit other than 3 only comes from a redraw: >= 5 threes before it
        for t in np.nonzero(half[i] != 3)[0]:
            assert (half[i, max(0, t - 10):t] == 3).sum() >= 5
    assert (half != 3).any()
    again, _ = run(rng=jax.random.key(0), window=10, tau_r=0.1)
    other, _ = run(rng=jax.random.key(1), window=10, tau_r=0.1)
    np.testing.assert_array_equal(again, ras)  # deterministic for a key
    assert (other != ras).any()
    # an item's draws follow its key, not its place in the batch: reversed items and keys
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(b))
    flipped, _ = ar_sample(gen, rig, *(x[::-1] for x in batch.values()), max_units=m,
                           top_p=0.5, rng=keys[::-1], window=10, tau_r=0.1)
    np.testing.assert_array_equal(flipped[::-1], ras)


def test_bad_arguments():
    cfg, gen, params, batch = ar_setup(0)
    args = (gen, {"params": params}, *batch.values())
    key = jax.random.key(0)
    for kw, match in [(dict(max_units=0), "max_units must be a positive int"),
                      (dict(max_units=4, top_p=0.0), "top_p must be in"),
                      (dict(max_units=4, top_p=1.5), "top_p must be in"),
                      (dict(max_units=4, top_k=0), "top_k must be an int >= 1"),
                      (dict(max_units=4, window=-1), "window must be an int >= 0"),
                      (dict(max_units=4, tau_r=0.0), "tau_r"),
                      (dict(max_units=4, temperature=0.0), "temperature must be > 0"),
                      (dict(max_units=10 ** 6), "max_position_embeddings")]:
        with pytest.raises(ValueError, match=match):
            ar_sample(*args, rng=key, **kw)
    with pytest.raises(ValueError, match="needs an rng key"):
        ar_sample(*args, max_units=4)
    with pytest.raises(ValueError, match="rng must be one key or"):
        ar_sample(*args, max_units=4, rng=jax.random.split(key, 3))
    with pytest.raises(ValueError, match="hidden must be"):
        ar_sample(gen, {"params": params}, batch["hidden"][..., :5], *list(batch.values())[1:],
                  max_units=4, greedy=True)
    ctc = SpeechGenerator(speech_preset("tiny", H, "ctc"))
    with pytest.raises(ValueError, match="needs an AR SpeechGenerator.*mode 'ctc'"):
        ar_sample(ctc, {"params": params}, *batch.values(), max_units=4, greedy=True)
    with pytest.raises(ValueError, match="log_probs must be"):
        ctc_greedy(np.zeros((3, 5)), np.ones((3, 5), bool))
    with pytest.raises(ValueError, match="frame_mask must have shape"):
        ctc_greedy(np.zeros((2, 5, 4)), np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="blank=7 is outside"):
        ctc_greedy(np.zeros((2, 5, 4)), np.ones((2, 5), bool), blank=7)
