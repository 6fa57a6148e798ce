"""OpenOmni stage V (emotional DPO) through the Trainer: SpeechLM(dpo_reference=True) after a
brief CTC stage on the synthetic words -> units task (omni_jax.speech.synthetic).

The CTC stage sees both renderings of its responses (30% expressive, as emotional speech is part
of the generation data), so greedy decoding starts neutral while the expressive units keep some
probability; DPO (chosen = expressive, rejected = neutral) on 512 responses then moves held-out
responses (unseen word sequences) towards the expressive style. The reference ("speech_ref") is
the generator copied at DPO start (prepare_params) and frozen.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import numpy as np
import pytest

from omni_jax.speech.decode import ctc_greedy
from omni_jax.speech.generator import SpeechGenerator
from omni_jax.speech.synthetic import SyntheticSpeechTask, tiny_generator_config, unit_error_rate
from omni_jax.train.speech_model import SpeechLM
from omni_jax.train.stages import param_paths
from omni_jax.train.trainer import Trainer, default_config

TASK = SyntheticSpeechTask()
TRAIN = TASK.sample(1024, seed=1)
DPO_TRAIN = TRAIN[:512]
HELD_OUT = TASK.sample(128, seed=2, exclude=TRAIN)
CFG = tiny_generator_config(TASK, "ctc")
BETA = 0.1
DPO_LOSSES = {"dpo": {"weight": 1.0, "beta": BETA}}
DPO_STEPS = 100


def host(tree: Any) -> Any:
    return jax.tree.map(np.array, jax.device_get(tree))


def trainer_config(steps: int, losses: dict[str, Any], lr: float, batch: int,
                   warmup: int) -> Any:
    c = default_config()
    c.batch_size, c.steps, c.mesh = batch, steps, {"data": 1}
    c.optim.update(lr=lr, warmup_steps=warmup, schedule="cosine", clip_norm=1.0)
    c.stage = {"name": "speech", "trainable": ("^speech/",), "losses": losses}
    c.progress_bar = c.tensorboard = False
    return c


def dpo_batch(items: list, seed: int) -> dict[str, np.ndarray]:
    return TASK.batch(items, seed=seed, chosen="expressive", rejected="neutral")


@functools.cache
def pretrained() -> dict[str, Any]:
    """Stage IV: 400 CTC steps (batch 32, 5e-3) on TRAIN, 30% of the targets expressive ->
    host params {"speech": ...} (no reference)."""
    trainer = Trainer(trainer_config(400, {"ctc": 1.0}, 5e-3, 32, 30), SpeechLM(CFG))
    state = trainer.init_state(TASK.batch(TRAIN[:32]))
    stream = TASK.stream(TRAIN, 32, seed=0, expressive=0.3)
    for _ in range(400):
        state, _ = trainer.train_step(state, trainer.shard(next(stream)))
    return host(state["params"])


_decode = jax.jit(SpeechGenerator(CFG).apply)


def evaluate(model: SpeechLM, params: Any, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Held-out implicit-reward margins, preference accuracy (ties count 1/2), and the policy's
    greedy CTC decode: its share of style units and its UER against either rendering."""
    out = jax.jit(model.apply)(params, batch)
    chosen = np.asarray(out["dpo_policy_chosen"] - out["dpo_ref_chosen"])
    rejected = np.asarray(out["dpo_policy_rejected"] - out["dpo_ref_rejected"])
    margin = chosen - rejected
    dec = _decode({"params": params["speech"]}, batch["speech_hidden"],
                  batch["speech_rows"].astype(bool), batch["speech_text_ids"],
                  batch["speech_text_mask"].astype(bool))
    hyps = ctc_greedy(dec["speech_log_probs"], dec["speech_frame_mask"])
    return {"margin": margin, "accuracy": float(np.mean((margin > 0) + 0.5 * (margin == 0))),
            "style": TASK.style_fraction(hyps),
            "uer_chosen": unit_error_rate(hyps, TASK.references(batch)),
            "uer_rejected": unit_error_rate(hyps, TASK.references(batch, rejected=True))}


@functools.cache
def dpo_run() -> dict[str, Any]:
    """Stage V: 100 DPO steps (batch 16, AdamW 1e-4, warmup 10) from the CTC params."""
    model = SpeechLM(CFG, dpo_reference=True)
    params = model.prepare_params(pretrained())
    trainer = Trainer(trainer_config(DPO_STEPS, DPO_LOSSES, 1e-4, 16, 10), model)
    held = dpo_batch(HELD_OUT, seed=8)
    state = trainer.init_state(dpo_batch(DPO_TRAIN[:16], seed=0), params)
    start = host(state["params"])
    stream = TASK.stream(DPO_TRAIN, 16, seed=0, expressive=1.0, rejected="neutral")
    first = None
    for _ in range(DPO_STEPS):
        state, m = trainer.train_step(state, trainer.shard(next(stream)))
        first = host(m) if first is None else first
    end = host(state["params"])
    run = {"trainer": trainer, "start": start, "end": end, "first": first,
           "opt_state": host(state["opt_state"]), "before": evaluate(model, start, held),
           "after": evaluate(model, end, held)}
    for k in ("before", "after"):
        r = run[k]
        print(f"DPO {k}: held-out accuracy {r['accuracy']:.3f}, mean margin "
              f"{r['margin'].mean():.4f}, style units {r['style']:.3f}, UER vs chosen "
              f"{r['uer_chosen']:.3f}, vs rejected {r['uer_rejected']:.3f}")
    return run


# ------------------------------------------------------------------------- hand-computed

def ctc_logprob(log_probs: np.ndarray, labels: np.ndarray, blank: int) -> float:
    """log p(labels | frames) by the CTC forward recursion (float64): log_probs [T, V + 1]."""
    ext = [blank]
    for u in labels:
        ext += [int(u), blank]
    alpha = np.full(len(ext), -np.inf)
    alpha[0], alpha[1] = log_probs[0, blank], log_probs[0, ext[1]]
    for t in range(1, len(log_probs)):
        prev = alpha.copy()
        for s in range(len(ext)):
            terms = [prev[s]] + ([prev[s - 1]] if s >= 1 else [])
            if s >= 2 and ext[s] != blank and ext[s] != ext[s - 2]:
                terms.append(prev[s - 2])
            alpha[s] = np.logaddexp.reduce(terms) + log_probs[t, ext[s]]
    return float(np.logaddexp(alpha[-1], alpha[-2]))


def hand_dpo_loss(params: Any, batch: dict[str, np.ndarray]) -> float:
    """-mean log sigmoid(beta [(l_pc - l_pr) - (l_rc - l_rr)]) with l(y) = log p(y) / |y|,
    every l from the generator's log-probs by ctc_logprob."""
    gen = SpeechGenerator(CFG)
    ls = {}
    for who in ("speech", "speech_ref"):
        for sfx in ("", "_rejected"):
            out = gen.apply({"params": params[who]}, batch["speech_hidden"],
                            batch["speech_rows"].astype(bool), batch["speech_text_ids"],
                            batch["speech_text_mask"].astype(bool), batch["speech_units" + sfx],
                            batch["speech_unit_mask" + sfx].astype(bool))
            lp = np.asarray(out["speech_log_probs"], np.float64)
            frames = np.asarray(out["speech_frame_mask"]).sum(axis=1)
            refs = TASK.references(batch, rejected=bool(sfx))
            ls[who, sfx] = np.array([ctc_logprob(lp[i, :frames[i]], np.array(r), CFG.unit_vocab)
                                     / len(r) for i, r in enumerate(refs)])
    logits = (ls["speech", ""] - ls["speech", "_rejected"]) - (
        ls["speech_ref", ""] - ls["speech_ref", "_rejected"])
    return float(np.mean(np.logaddexp(0.0, -BETA * logits)))  # -log sigmoid(beta x)


def perturbed(params: Any, scale: float = 0.05) -> Any:
    """The policy moved away from the reference by Gaussian noise on every leaf."""
    leaves, tree = jax.tree.flatten(params["speech"])
    keys = jax.random.split(jax.random.key(3), len(leaves))
    noisy = [np.asarray(x + scale * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)]
    return {**params, "speech": jax.tree.unflatten(tree, noisy)}


# ---------------------------------------------------------------------------------- tests

def test_prepare_params_chains_ctc_stage_into_dpo():
    ctc = pretrained()
    assert set(ctc) == {"speech"}
    dpo = SpeechLM(CFG, dpo_reference=True).prepare_params(ctc)
    assert set(dpo) == {"speech", "speech_ref"}
    ref, gen = jax.tree.leaves(dpo["speech_ref"]), jax.tree.leaves(ctc["speech"])
    assert len(ref) == len(gen)
    for a, b in zip(ref, gen):
        assert a is not b  # a copy, not an alias of the generator's buffers
        np.testing.assert_array_equal(np.asarray(a), b)
    again = SpeechLM(CFG, dpo_reference=True).prepare_params(perturbed(dpo))
    assert again["speech_ref"] is dpo["speech_ref"]  # an existing reference is kept
    assert set(SpeechLM(CFG).prepare_params(dpo)) == {"speech"}  # a later stage drops it
    with pytest.raises(ValueError, match="no 'speech' generator"):
        SpeechLM(CFG, dpo_reference=True).prepare_params({"llm": {}})


def test_dpo_step0_loss_is_log2():
    """Policy == reference at DPO start: every logit is 0, loss = -log sigmoid(0) = log 2."""
    m = dpo_run()["first"]
    np.testing.assert_allclose(m["loss/dpo"], math.log(2.0), rtol=1e-6)
    assert abs(float(m["dpo/margin"])) < 1e-6 and m["dpo/pairs"] == 16


def test_dpo_loss_matches_hand_computed_for_perturbed_policy():
    trainer = dpo_run()["trainer"]
    params = perturbed(SpeechLM(CFG, dpo_reference=True).prepare_params(pretrained()))
    batch = dpo_batch(HELD_OUT[:16], seed=11)
    got = float(trainer.eval_step(params, trainer.shard(batch))["loss/dpo"])
    want = hand_dpo_loss(params, batch)
    assert abs(want - math.log(2.0)) > 1e-3  # the perturbation moves the loss off log 2
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_dpo_padding_rows_do_not_count():
    trainer = dpo_run()["trainer"]
    params = perturbed(SpeechLM(CFG, dpo_reference=True).prepare_params(pretrained()))
    real = dpo_batch(HELD_OUT[:12], seed=11)
    padded = {k: np.concatenate([v, np.zeros((4, *v.shape[1:]), v.dtype)]) for k, v in
              real.items()}  # 4 padding rows, as collate_speech leaves past the examples
    got = float(trainer.eval_step(params, trainer.shard(padded))["loss/dpo"])
    np.testing.assert_allclose(got, hand_dpo_loss(params, real), rtol=1e-5)


def test_dpo_pairs_with_an_infeasible_side_do_not_count():
    """A rendering its frames cannot hold has l(y) = 0 (zero_infinity) under policy and
    reference alike: its pair's margin is no preference (an infeasible chosen side would only
    push the rejected one down, an infeasible rejected side only the chosen one up). Such a
    pair counts as a padding row does: not at all. Chosen side broken in some rows, rejected
    in others."""
    trainer = dpo_run()["trainer"]
    params = perturbed(SpeechLM(CFG, dpo_reference=True).prepare_params(pretrained()))
    batch = dpo_batch(HELD_OUT[:16], seed=11)
    width = batch["speech_units"].shape[1]
    frames = CFG.upsample * batch["speech_text_mask"].sum(1)  # >= the units' count here
    bad = np.flatnonzero(frames < 2 * width - 1)[:4]  # rows a run of `width` equal units breaks
    assert bad.size >= 2
    broken = {k: v.copy() for k, v in batch.items()}
    for rows, sfx in ((bad[::2], ""), (bad[1::2], "_rejected")):
        broken["speech_units" + sfx][rows] = broken["speech_units" + sfx][rows, :1]  # one unit
        broken["speech_unit_mask" + sfx][rows] = 1  # ... `width` times
    m = trainer.eval_step(params, trainer.shard(broken))
    keep = np.setdiff1d(np.arange(16), bad)
    assert int(m["dpo/pairs"]) == keep.size
    want = hand_dpo_loss(params, {k: v[keep] for k, v in batch.items()})
    np.testing.assert_allclose(float(m["loss/dpo"]), want, rtol=1e-5)


def test_dpo_freezes_reference_and_trains_policy():
    run = dpo_run()
    ctc = pretrained()
    paths = jax.tree.leaves(param_paths(run["start"]))
    labels = jax.tree.leaves(run["trainer"].labels)
    for path, lab in zip(paths, labels):
        assert lab == ("freeze" if path.startswith("speech_ref/") else "train"), path
    for a, b, c in zip(jax.tree.leaves(run["start"]["speech_ref"]),
                       jax.tree.leaves(run["end"]["speech_ref"]),
                       jax.tree.leaves(ctc["speech"])):
        np.testing.assert_array_equal(a, b)  # bit-identical after 100 DPO steps
        np.testing.assert_array_equal(a, c)  # and still the CTC stage's generator
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(run["start"]["speech"]),
                                                          jax.tree.leaves(run["end"]["speech"]))]
    # every policy leaf moves except the causal decoder's key biases (softmax-invariant)
    unchanged = [p for p, c in zip(jax.tree.leaves(param_paths(run["start"]["speech"])), changed)
                 if not c]
    assert all(p.endswith("k/bias") for p in unchanged), unchanged
    assert sum(changed) >= len(changed) - 2
    # Adam moments only for the policy: 2 arrays per "speech" leaf, none for the reference
    policy = jax.tree.leaves(run["start"]["speech"])
    arrays = [x for x in jax.tree.leaves(run["opt_state"]) if np.ndim(x) > 0]
    assert len(arrays) == 2 * len(policy)
    assert sum(x.size for x in arrays) == 2 * sum(x.size for x in policy)


def test_dpo_held_out_preference_and_style_shift():
    before, after = dpo_run()["before"], dpo_run()["after"]
    # start: the policy is the reference, every held-out margin is exactly 0 (ties: 50%)
    assert np.all(before["margin"] == 0) and before["accuracy"] == 0.5
    # measured: 0.5 -> 1.0 on 128 unseen responses
    assert after["accuracy"] >= 0.9
    # greedy decode moves to the chosen style: style units 0.011 -> 0.247 of decoded units
    # (all-expressive targets hold ~1/3), UER vs chosen 0.321 -> 0.120, vs rejected 0.047 -> 0.310
    assert before["style"] < 0.05 and after["style"] > 0.15
    assert after["uer_chosen"] < before["uer_chosen"] - 0.1
    assert after["uer_rejected"] > before["uer_rejected"] + 0.1
