"""Speech generator (OpenOmni): CTC / AR forward vs a PyTorch reference, soft MoE, the float32
stretch rule, KV-cache decoding, the paper preset's size, config and input errors."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.core import meta
from torch_ref import SoftMoETorch, TorchSpeechGenerator, to_jax_params

from omni_jax.layers import moe as moe_lib
from omni_jax.layers.moe import SoftMoE
from omni_jax.llm.config import LLMConfig
from omni_jax.speech.config import SpeechGenConfig, check_compatible, speech_preset
from omni_jax.speech.generator import (
    SpeechGenerator,
    check_speech_batch,
    segment_bins,
    speech_cache,
    stretch_index,
)

H = 24  # LLM hidden width in the tiny tests


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Zero biases / unit norms at init would hide mapping bugs: make them count."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def make_batch(seed: int, s_lens, u_lens, rows, r: int, vocab: int, units: int, s: int, u: int):
    """Right-padded text / units; hidden rows chosen by explicit index lists (anywhere in r)."""
    rng = np.random.default_rng(seed)
    b = len(s_lens)
    row_mask = np.zeros((b, r), bool)
    for i, idx in enumerate(rows):
        row_mask[i, idx] = True
    batch = {"hidden": rng.standard_normal((b, r, H)).astype(np.float32), "row_mask": row_mask,
             "text_ids": rng.integers(0, vocab, (b, s)).astype(np.int32),
             "text_mask": np.arange(s)[None] < np.asarray(s_lens)[:, None]}
    if u:
        batch["units"] = rng.integers(0, units, (b, u)).astype(np.int32)
        batch["unit_mask"] = np.arange(u)[None] < np.asarray(u_lens)[:, None]
    return batch


def run_torch(model, batch):
    with torch.no_grad():
        return model(*(torch.tensor(batch[k]) if k in batch else None
                       for k in ("hidden", "row_mask", "text_ids", "text_mask", "units",
                                 "unit_mask")))


def run_jax(cfg, params, batch, method=None):
    args = [jnp.asarray(batch[k]) for k in ("hidden", "row_mask", "text_ids", "text_mask")]
    args += [jnp.asarray(batch[k]) if k in batch else None for k in ("units", "unit_mask")]
    return jax.jit(partial(SpeechGenerator(cfg).apply, method=method))(params, *args)


def fuse(cfg, params, batch):
    args = [jnp.asarray(batch[k]) for k in ("hidden", "row_mask", "text_ids")]
    return np.asarray(jax.jit(partial(SpeechGenerator(cfg).apply, method=SpeechGenerator.fuse))(
        params, *args))


# item 0: S=14 stretched to 228 frames (a float32 boundary, see test_stretch_rule); item 1 not
# stretched (12 * 5 = 60 > 40 units); item 2 stretched (36 -> 50), shorter everything.
CTC_ITEMS = dict(s_lens=[14, 5, 3], u_lens=[228, 40, 50],
                 rows=[[0, 2, 3, 5, 6, 9, 10], [1, 4, 5, 6, 7, 8, 9, 10, 11], [3, 7, 8]], r=12)


@pytest.mark.parametrize("with_targets, segment_positions",
                         [(True, False), (False, False), (True, True), (False, True)])
def test_ctc_matches_torch(with_targets, segment_positions):
    cfg = speech_preset("tiny", H, "ctc", segment_positions=segment_positions)
    model = perturbed(TorchSpeechGenerator(cfg), seed=0)
    params = to_jax_params(model)
    batch = make_batch(0, **CTC_ITEMS, vocab=cfg.decoder.vocab_size, units=cfg.unit_vocab, s=14,
                       u=228 if with_targets else 0)
    ref = run_torch(model, batch)
    out = run_jax(cfg, params, batch)
    frames = np.asarray(out["speech_frames"])
    np.testing.assert_array_equal(frames, ref["speech_frames"].numpy())
    want = [228, 60, 50] if with_targets else [168, 60, 36]
    np.testing.assert_array_equal(frames, want)
    lp, mask = np.asarray(out["speech_log_probs"]), np.asarray(out["speech_frame_mask"])
    assert lp.shape == (3, 228 if with_targets else 168, cfg.unit_vocab + 1)
    np.testing.assert_array_equal(mask, np.arange(lp.shape[1])[None] < frames[:, None])
    r = ref["speech_log_probs"].numpy()
    assert r[0, :frames[0]].std() > 0.1  # the output is not near-uniform
    err = max(np.abs(lp[i, :n] - r[i, :n]).max() for i, n in enumerate(frames))
    print(f"CTC log-prob max abs error vs torch (targets={with_targets}, segment_positions="
          f"{segment_positions}): {err:.2e}")
    assert err < 5e-6


def test_segment_positions_tell_a_tokens_frames_apart():
    """Without segment positions the frames of the first token are copies of one vector and the
    causal RoPE decoder gives them identical outputs (at most one CTC unit for a one-token
    answer); with them each frame's output differs. segment_bins against a loop."""
    outs = {}
    for seg in (False, True):
        cfg = speech_preset("tiny", H, "ctc", upsample=24, segment_positions=seg)
        params = to_jax_params(perturbed(TorchSpeechGenerator(cfg), seed=2))
        batch = make_batch(2, s_lens=[1, 2], u_lens=[0, 0], rows=[[0, 1], [0, 1, 2]], r=3,
                           vocab=cfg.decoder.vocab_size, units=cfg.unit_vocab, s=2, u=0)
        lp = np.asarray(run_jax(cfg, params, batch)["speech_log_probs"])
        outs[seg] = np.abs(lp[:, :24] - lp[:, :1]).max(axis=(1, 2))  # first segment spread
    print(f"first segment's log-prob spread: off {outs[False]}, on {outs[True]}")
    assert outs[False].max() < 1e-5 and outs[True].min() > 1e-3
    s_len, up = np.asarray([3, 2, 5]), np.asarray([40, 24, 60])
    idx, mask = stretch_index(jnp.asarray(s_len), jnp.asarray(up), 64)
    got = np.asarray(segment_bins(idx, mask, 5, 12))
    for b in range(3):
        want, i = [], np.asarray(idx[b, :up[b]])
        for k in range(s_len[b]):
            n = int((i == k).sum())
            want += [j * 12 // n for j in range(n)]
        np.testing.assert_array_equal(got[b, :up[b]], want)
        assert (got[b, up[b]:] == 0).all()
    np.testing.assert_array_equal(got[1, :24], np.tile(np.arange(12), 2))  # unstretched


def test_ctc_ignores_padding_and_unselected_rows():
    cfg = speech_preset("tiny", H, "ctc")
    params = to_jax_params(perturbed(TorchSpeechGenerator(cfg), seed=1))
    batch = make_batch(1, **CTC_ITEMS, vocab=cfg.decoder.vocab_size, units=cfg.unit_vocab, s=14,
                       u=228)
    out = run_jax(cfg, params, batch)
    noisy = dict(batch)
    rng = np.random.default_rng(9)
    noisy["hidden"] = np.where(batch["row_mask"][..., None], batch["hidden"],
                               rng.standard_normal(batch["hidden"].shape)).astype(np.float32)
    noisy["text_ids"] = np.where(batch["text_mask"], batch["text_ids"], 7).astype(np.int32)
    noisy["units"] = np.where(batch["unit_mask"], batch["units"], -100).astype(np.int32)
    out2 = run_jax(cfg, params, noisy)
    m = np.asarray(out["speech_frame_mask"])
    a, b = np.asarray(out["speech_log_probs"]), np.asarray(out2["speech_log_probs"])
    assert np.abs(a[m] - b[m]).max() < 1e-6
    fused, tm = fuse(cfg, params, batch), batch["text_mask"]
    assert np.abs(fused[tm] - fuse(cfg, params, noisy)[tm]).max() < 1e-6
    moved = dict(batch, hidden=batch["hidden"].copy())
    moved["hidden"][2, 7] += 1.0  # a selected row of item 2: only item 2 changes
    delta = np.abs(fused - fuse(cfg, params, moved)).max(axis=-1)  # [b, s]
    assert delta[2][tm[2]].min() > 1e-4 and delta[:2].max() == 0


@pytest.mark.parametrize("mode", ["ctc", "ar"])
def test_empty_item_changes_nothing(mode):
    """A fully padded batch item (no rows, text or units) yields no frames / targets, no NaN,
    and leaves the other items as they are alone."""
    cfg = speech_preset("tiny", H, mode)
    params = to_jax_params(perturbed(TorchSpeechGenerator(cfg), seed=6))
    batch = make_batch(6, s_lens=[4, 0], u_lens=[30, 0], rows=[[0, 2, 3], []], r=4,
                       vocab=cfg.decoder.vocab_size, units=cfg.unit_vocab, s=4, u=30)
    check_speech_batch(cfg, batch)
    out = run_jax(cfg, params, batch)
    alone = run_jax(cfg, params, {k: v[:1] for k, v in batch.items()})
    key, mask = (("speech_log_probs", "speech_frame_mask") if mode == "ctc" else
                 ("speech_ar_logits", "speech_ar_mask"))
    m = np.asarray(out[mask])
    assert m[0].sum() == (48 if mode == "ctc" else 31) and not m[1].any()
    got = np.asarray(out[key])
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[0][m[0]], np.asarray(alone[key])[0][m[0]], atol=1e-5)


def test_soft_moe_matches_torch():
    torch.manual_seed(3)
    ref = perturbed(SoftMoETorch(12, 20, 16, 4), seed=3)
    x = np.random.default_rng(3).standard_normal((2, 5, 12)).astype(np.float32)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    stack = lambda f: np.stack([sd[f.format(e)] for e in range(4)])  # noqa: E731
    params = {"params": {
        "gate": {"kernel": sd["gate.fc.weight"].T, "bias": sd["gate.fc.bias"]},
        "fc1_kernel": stack("experts.{}.fc1.weight").transpose(0, 2, 1),
        "fc1_bias": stack("experts.{}.fc1.bias"),
        "fc2_kernel": stack("experts.{}.fc2.weight").transpose(0, 2, 1),
        "fc2_bias": stack("experts.{}.fc2.bias")}}
    got = np.asarray(SoftMoE(4, 20, 16).apply(params, jnp.asarray(x)))
    with torch.no_grad():
        want = ref(torch.tensor(x)).numpy()
    err = np.abs(got - want).max()
    print(f"soft MoE max abs error vs torch: {err:.2e}")
    assert err < 1e-5 and np.abs(want).max() > 0.1


def test_stretch_rule_is_float32():
    case = None
    for s in range(1, 40):  # find a (tokens, frames) pair where float32 and integer floor differ
        for up in range(12 * s, 12 * s + 200):
            t = np.arange(up)
            f32 = np.floor(t.astype(np.float32) / (np.float32(up) / np.float32(s))).astype(int)
            if (f32 != t * s // up).any():
                case = (s, up, f32, t * s // up)
                break
        if case:
            break
    s, up, f32, exact = case
    idx, mask = stretch_index(jnp.asarray([s, 2]), jnp.asarray([up, 24]), up + 3)
    idx, mask = np.asarray(idx), np.asarray(mask)
    np.testing.assert_array_equal(idx[0, :up], f32)
    assert (idx[0, :up] != exact).any()
    np.testing.assert_array_equal(mask[0], np.arange(up + 3) < up)
    np.testing.assert_array_equal(idx[1, :24], np.arange(24) // 12)
    assert not mask[1, 24:].any() and (idx[1, 24:] == 0).all()


AR_ITEMS = dict(s_lens=[5, 2, 4], u_lens=[7, 0, 3], rows=[[0, 1, 4, 5], [2, 3, 5], [1, 2]], r=6)


def ar_setup(seed: int):
    cfg = speech_preset("tiny", H, "ar")
    model = perturbed(TorchSpeechGenerator(cfg), seed=seed)
    return cfg, model, to_jax_params(model)


def test_ar_teacher_forcing_matches_torch():
    cfg, model, params = ar_setup(4)
    assert cfg.moe == "mlp"
    batch = make_batch(4, **AR_ITEMS, vocab=cfg.decoder.vocab_size, units=cfg.unit_vocab, s=5,
                       u=7)
    ref = run_torch(model, batch)
    out = run_jax(cfg, params, batch)
    logits = np.asarray(out["speech_ar_logits"])
    assert logits.shape == (3, 5 + 2 + 7, cfg.unit_vocab + 1)
    r, lens = ref["speech_ar_logits"].numpy(), ref["lengths"].numpy()
    err = max(np.abs(logits[i, :n] - r[i, :n]).max() for i, n in enumerate(lens))
    print(f"AR logit max abs error vs torch: {err:.2e}")
    assert err < 5e-6 and r.std() > 0.1
    targets, mask = np.asarray(out["speech_ar_targets"]), np.asarray(out["speech_ar_mask"])
    want_t, want_m = np.zeros_like(targets), np.zeros_like(mask)
    for i, (s, u) in enumerate(zip(AR_ITEMS["s_lens"], AR_ITEMS["u_lens"])):
        seq = list(batch["units"][i, :u]) + [cfg.unit_vocab]  # [task] -> u_1, ..., u_U -> EOS
        want_t[i, s + 1:s + 2 + u], want_m[i, s + 1:s + 2 + u] = seq, True
    np.testing.assert_array_equal(targets, want_t)
    np.testing.assert_array_equal(mask, want_m)


def test_ar_kv_cache_greedy_matches_full_forward():
    cfg, _, params = ar_setup(5)
    batch = make_batch(5, **AR_ITEMS, vocab=cfg.decoder.vocab_size, units=cfg.unit_vocab, s=5,
                       u=0)
    gen, steps = SpeechGenerator(cfg), 4
    cache = speech_cache(cfg, 3, 5 + 2 + steps)
    args = [jnp.asarray(batch[k]) for k in ("hidden", "row_mask", "text_ids", "text_mask")]
    prefill = jax.jit(partial(gen.apply, method=SpeechGenerator.ar_prefill))
    logits, cache, lengths = prefill(params, *args, cache)
    step = jax.jit(lambda p, u, pos, c: gen.apply(p, u, pos, c, method=SpeechGenerator.ar_step))
    got, units = [np.asarray(logits)], []
    for j in range(steps):
        units.append(jnp.argmax(logits, axis=-1).astype(jnp.int32))
        logits, cache = step(params, units[-1], lengths + j, cache)
        got.append(np.asarray(logits))
    units = np.stack([np.asarray(u) for u in units], axis=1)
    full = run_jax(cfg, params, dict(batch, units=units, unit_mask=np.ones_like(units, bool)))
    full = np.asarray(full["speech_ar_logits"])
    s = np.asarray(lengths) - 2
    want = np.stack([full[i, s[i] + 1:s[i] + 2 + steps] for i in range(3)])  # [b, steps+1, V+1]
    got = np.stack(got, axis=1)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(units, want[:, :steps].argmax(-1))
    assert len(np.unique(units)) > 1  # the greedy path is not a constant


def paper_count(c: SpeechGenConfig) -> int:
    hh, n, e, f, v = c.llm_hidden, c.width, c.num_experts, c.expansion * c.width, c.num_outputs
    inner, q = c.expert_hidden, c.fusion_heads * c.fusion_head_dim
    if c.moe == "soft":
        proj = hh * e + e + e * (hh * inner + inner + inner * f + f)
    else:
        proj = hh * inner + inner + inner * f + f
    fusion = c.fusion_layers * (3 * 2 * n + n * q * 4 + 2 * c.fusion_ff_mult * n * n) + 2 * n
    extra = 2 * n + v * n if c.mode == "ar" else 0
    return 2 * hh + proj + fusion + 494_032_768 + n * v + v + extra


@pytest.mark.parametrize("mode", ["ctc", "ar"])
def test_paper_preset_builds_abstractly(mode):
    cfg = speech_preset("paper", 3584, mode)
    assert cfg.decoder.num_params() == 494_032_768 and cfg.width == 896
    assert cfg.unit_vocab == {"ctc": 6561, "ar": 16384}[mode]
    b = make_batch(0, s_lens=[2], u_lens=[3], rows=[[0, 1]], r=3, vocab=10, units=10, s=2, u=3)
    b["hidden"] = np.zeros((1, 3, 3584), np.float32)
    args = [jnp.asarray(b[k]) for k in ("hidden", "row_mask", "text_ids", "text_mask", "units",
                                        "unit_mask")]
    shapes = jax.eval_shape(SpeechGenerator(cfg).init, jax.random.key(0), *args)
    leaves = jax.tree_util.tree_leaves(meta.unbox(shapes))
    total = sum(int(np.prod(x.shape)) for x in leaves)
    llm = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
        meta.unbox(shapes)["params"]["llm"]))
    print(f"paper {mode} generator: {total:,} params ({llm:,} in the decoder)")
    assert llm == 494_032_768
    assert total == paper_count(cfg)


def test_config_round_trip_and_presets():
    cfg = speech_preset("tiny", H, "ar", text_vocab=300, upsample=6)
    d = cfg.to_dict()
    assert isinstance(d["decoder"], dict) and d["decoder"]["vocab_size"] == 300
    assert SpeechGenConfig.from_dict(d) == cfg
    assert cfg.moe == "mlp" and cfg.expert_hidden == 4 * 32 and cfg.upsample == 6
    assert SpeechGenConfig().moe == "soft" and SpeechGenConfig(mode="ar").moe == "mlp"
    with pytest.raises(ValueError, match="unknown keys"):
        SpeechGenConfig.from_dict({**d, "upsampel": 3})
    with pytest.raises(ValueError, match="unknown speech preset"):
        speech_preset("huge", H)
    check_compatible(cfg, LLMConfig(hidden_size=H, num_heads=4, vocab_size=300))
    with pytest.raises(ValueError, match="llm_hidden=24 but the LLM's hidden_size is 64"):
        check_compatible(cfg, LLMConfig(hidden_size=64, vocab_size=300))
    with pytest.raises(ValueError, match="smaller than the LLM's vocab_size=301"):
        check_compatible(cfg, LLMConfig(hidden_size=H, num_heads=4, vocab_size=301))


@pytest.mark.parametrize("kw, match", [
    (dict(mode="nar"), "mode: unknown value"),
    (dict(moe="dense"), "moe: unknown value"),
    (dict(upsample=0), "upsample must be positive"),
    (dict(moe="sparse", moe_top_k=5), "moe_top_k must be in"),
    (dict(sample_top_p=1.5), "sample_top_p must be in"),
    (dict(repetition_window=-1), "repetition_window must be >= 0"),
    (dict(decoder={"hidden_size": 32}), "decoder must be an LLMConfig"),
    (dict(mode="ar", segment_positions=True), "segment_positions applies to CTC frames"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        SpeechGenConfig(**kw)


def test_bad_inputs():
    cfg = speech_preset("tiny", H, "ctc")
    good = make_batch(0, s_lens=[3, 2], u_lens=[5, 4], rows=[[0, 2], [1]], r=4, vocab=50,
                      units=cfg.unit_vocab, s=3, u=5)
    check_speech_batch(cfg, good)
    bad_text = dict(good, text_mask=np.array([[1, 1, 1], [0, 0, 0]], bool))
    cases = [
        (bad_text, "items \\[1\\] have target units but empty response text"),
        (dict(good, units=np.where(good["unit_mask"], cfg.unit_vocab, 0)), "units must be in"),
        (dict(good, units=np.full_like(good["units"], -1)), "units must be in"),
        (dict(good, hidden=good["hidden"][..., :16]), "llm_hidden=24"),
        (dict(good, text_mask=np.array([[1, 0, 1], [1, 1, 0]], bool)), "must be right padded"),
        (dict(good, row_mask=np.zeros((2, 4), bool)), "no hidden rows"),
        (dict(good, unit_mask=good["unit_mask"][:, :4]), "unit_mask must have shape"),
    ]
    for batch, match in cases:
        with pytest.raises(ValueError, match=match):
            check_speech_batch(cfg, batch)
    args = [jnp.asarray(good[k]) for k in ("hidden", "row_mask", "text_ids", "text_mask")]
    init = lambda *a, **kw: jax.eval_shape(  # noqa: E731
        partial(SpeechGenerator(cfg).init, **kw), jax.random.key(0), *a)
    with pytest.raises(ValueError, match="llm_hidden=24"):  # the module checks it too
        init(args[0][..., :16], *args[1:])
    with pytest.raises(ValueError, match="ar_prefill needs SpeechGenConfig.mode='ar'"):
        init(*args, speech_cache(cfg, 2, 8), method=SpeechGenerator.ar_prefill)


def test_sparse_moe_wiring():
    cfg = speech_preset("tiny", H, "ctc", moe="sparse")
    b = make_batch(0, s_lens=[3, 2], u_lens=[5, 4], rows=[[0, 2], [1]], r=4, vocab=50,
                   units=cfg.unit_vocab, s=3, u=5)
    args = [jnp.asarray(b[k]) for k in ("hidden", "row_mask", "text_ids", "text_mask")]
    gen = SpeechGenerator(cfg)
    if not hasattr(moe_lib, "SparseMoE"):
        with pytest.raises(ValueError, match="needs omni_jax.layers.moe.SparseMoE"):
            gen.init(jax.random.key(0), *args)
        return
    variables = jax.jit(gen.init)(jax.random.key(0), *args)
    out = jax.jit(gen.apply)(variables, *args)
    assert "moe_aux" in out and out["speech_log_probs"].shape == (2, 36, cfg.unit_vocab + 1)
