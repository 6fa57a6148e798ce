"""The speech generator learns: CTC (soft MoE, 4 vs 1 experts) and AR training through the
Trainer + SpeechLM on the synthetic words -> units task (omni_jax.speech.synthetic), judged by
greedy decoding on held-out responses (unseen word sequences).

Measured with this file's code (2-core shared CPU, seeds 0 / 1 / 2; CTC 400 steps, batch 32,
AdamW 5e-3, warmup 30, cosine): held-out UER 4 experts 2.7% / 3.5% / 3.7%, 1 expert 2.8% /
3.2% / 3.4% (train 1.5-2.3%) — no difference at this size, so no direction is asserted. AR (800
steps): held-out greedy UER 8.3% / 5.5% / 1.4%. The tests run seed 0.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import jax
import numpy as np
import pytest

from omni_jax.speech.decode import ar_sample, ctc_greedy
from omni_jax.speech.generator import SpeechGenerator
from omni_jax.speech.synthetic import (
    LEAD,
    SyntheticSpeechTask,
    edit_distance,
    tiny_generator_config,
    unit_error_rate,
)
from omni_jax.train.speech_model import SpeechLM
from omni_jax.train.trainer import Trainer, default_config

TASK = SyntheticSpeechTask()
TRAIN = TASK.sample(1024, seed=1)
HELD_OUT = TASK.sample(128, seed=2, exclude=TRAIN)
BATCH = 32


def trainer_config(steps: int, losses: dict[str, Any], lr: float = 5e-3, warmup: int = 30,
                   batch: int = BATCH) -> Any:
    """Single-device AdamW + warmup + cosine; only the generator ("^speech/") trains."""
    c = default_config()
    c.batch_size, c.steps, c.mesh = batch, steps, {"data": 1}
    c.optim.update(lr=lr, warmup_steps=warmup, schedule="cosine", clip_norm=1.0)
    c.stage = {"name": "speech", "trainable": ("^speech/",), "losses": losses}
    c.progress_bar = c.tensorboard = False
    return c


def train(cfg: Any, steps: int, losses: dict[str, Any], seed: int = 0,
          task: SyntheticSpeechTask = TASK, items: Any = TRAIN) -> dict[str, Any]:
    """Train a SpeechLM on `items` (default TRAIN, neutral units) -> params, first / last
    losses, the trainer."""
    c = trainer_config(steps, losses)
    c.seed = seed
    trainer = Trainer(c, SpeechLM(cfg))
    stream = task.stream(items, BATCH, seed=seed)
    state = trainer.init_state(task.batch(items[:BATCH]))
    t0, losses_seen = time.time(), []
    for _ in range(steps):
        state, m = trainer.train_step(state, trainer.shard(next(stream)))
        losses_seen.append(float(m["loss/total"]))
    return {"params": jax.device_get(state["params"]), "trainer": trainer,
            "first": losses_seen[0], "last": float(np.mean(losses_seen[-10:])),
            "seconds": time.time() - t0}


def batches() -> dict[str, dict[str, np.ndarray]]:
    return {"train": TASK.batch(TRAIN[:128], seed=7), "held_out": TASK.batch(HELD_OUT, seed=8)}


def ctc_uer(cfg: Any, params: Any, batch: dict[str, np.ndarray],
            task: SyntheticSpeechTask = TASK) -> float:
    """Greedy CTC decoding (argmax, collapse repeats, drop blanks) -> unit error rate."""
    out = jax.jit(SpeechGenerator(cfg).apply)(
        {"params": params}, batch["speech_hidden"], batch["speech_rows"].astype(bool),
        batch["speech_text_ids"], batch["speech_text_mask"].astype(bool))
    hyps = ctc_greedy(out["speech_log_probs"], out["speech_frame_mask"])
    return unit_error_rate(hyps, task.references(batch))


@functools.cache
def ctc_run(num_experts: int, seed: int = 0) -> dict[str, Any]:
    """400 CTC steps with a soft MoE of `num_experts` (everything else equal)."""
    cfg = tiny_generator_config(TASK, "ctc", moe="soft", num_experts=num_experts)
    run = train(cfg, 400, {"ctc": 1.0}, seed)
    run["uer"] = {k: ctc_uer(cfg, run["params"]["speech"], b) for k, b in batches().items()}
    print(f"CTC {num_experts} expert(s): loss {run['first']:.3f} -> {run['last']:.3f}, UER "
          f"train {run['uer']['train']:.4f} held-out {run['uer']['held_out']:.4f} "
          f"({run['seconds']:.0f} s)")
    return run


# ---------------------------------------------------------------------------- the task

def test_synthetic_task_structure():
    """Deterministic, held-out = unseen word sequences, homographs need the LLM states, the
    framing (prompt rows unmarked, header / LEAD / words / trailer marked) and the styles."""
    a, b = TASK.batch(HELD_OUT[:8], seed=3), SyntheticSpeechTask().batch(HELD_OUT[:8], seed=3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert not {i[0] for i in TRAIN} & {i[0] for i in HELD_OUT} and len(HELD_OUT) == 128
    w = 0  # a homograph: one text id, two pronunciations, told apart only by the states
    assert w < TASK.num_homographs and TASK.pronunciation(w, 0) != TASK.pronunciation(w, 1)
    one, two = ((w, w + 7), (0, 0), 1), ((w, w + 7), (1, 0), 1)  # word 7: one sense
    x, y = TASK.batch([one], seed=5), TASK.batch([two], seed=5)
    np.testing.assert_array_equal(x["speech_text_ids"], y["speech_text_ids"])
    assert not np.array_equal(x["speech_units"], y["speech_units"])
    assert not np.allclose(x["speech_hidden"], y["speech_hidden"])
    rows, text = x["speech_rows"][0], x["speech_text_ids"][0]
    n_prompt = int(np.argmax(rows))  # unmarked prompt rows come first
    assert rows.sum() == 3 + 1 + 2 + 2 and rows[n_prompt:n_prompt + 8].all()
    assert list(text[:3]) == [LEAD, TASK.first_word_id + w, TASK.first_word_id + w + 7]
    neutral, expressive = TASK.units(one), TASK.units(one, "expressive")
    assert len(neutral) == len(expressive) and TASK.style_fraction([neutral]) == 0
    assert TASK.style_fraction([expressive]) == 2 / len(expressive)  # each word's first unit
    assert edit_distance([1, 2, 3], [1, 3]) == 1 and edit_distance([], [4, 5]) == 2
    assert unit_error_rate([[1, 2], [7]], [[1, 2, 3], [8]]) == pytest.approx(2 / 4)


# ------------------------------------------------------------------------------------- CTC

def test_ctc_learns_units_of_held_out_responses():
    run = ctc_run(4)
    # measured: loss 9.19 -> 0.048; UER train 1.5%, held-out 2.7%
    assert run["first"] > 5 and run["last"] < 0.2
    assert run["uer"]["train"] < 0.03
    assert run["uer"]["held_out"] < 0.05


def test_ctc_one_vs_four_experts_same_budget():
    """The paper's ablation (2 layers: 1 expert WER 87.8, 4 experts 4.2) does not reproduce at
    this size: 1 expert trains as well (held-out 2.8% / 3.2% / 3.4% vs 2.7% / 3.5% / 3.7% for
    4 experts over seeds 0-2), so the direction is reported, not asserted."""
    four, one = ctc_run(4), ctc_run(1)
    print(f"held-out UER: 4 experts {four['uer']['held_out']:.4f}, 1 expert "
          f"{one['uer']['held_out']:.4f}")
    assert all(math.isfinite(r["uer"]["held_out"]) and math.isfinite(r["last"])
               for r in (four, one))
    assert one["uer"]["held_out"] < 0.06  # measured 2.8%: it learns as well
    assert four["uer"]["held_out"] < 0.05


# -------------------------------------------------------------------------------------- AR

def ar_run(seed: int = 0) -> tuple[dict[str, Any], float, float]:
    """800 AR steps -> (run, held-out teacher-forced unit_ce, held-out greedy UER)."""
    cfg = tiny_generator_config(TASK, "ar")
    run = train(cfg, 800, {"unit_ce": 1.0}, seed)
    held = batches()["held_out"]
    ce = float(run["trainer"].eval_step(run["params"], run["trainer"].shard(held))["loss/total"])
    units, lengths = ar_sample(SpeechGenerator(cfg), {"params": run["params"]["speech"]},
                               held["speech_hidden"], held["speech_rows"].astype(bool),
                               held["speech_text_ids"], held["speech_text_mask"].astype(bool),
                               max_units=TASK.max_units + 4, greedy=True)
    uer = unit_error_rate([u[:n] for u, n in zip(units, lengths)], TASK.references(held))
    print(f"AR: unit_ce {run['first']:.3f} -> {run['last']:.4f} (held-out {ce:.3f}), greedy "
          f"held-out UER {uer:.4f} ({run['seconds']:.0f} s)")
    return run, ce, uer


def test_ar_learns_and_greedy_decodes_held_out():
    run, ce, uer = ar_run()
    # measured: unit_ce 3.80 -> 0.0055 (held-out teacher-forced 0.083), greedy UER 8.3%
    assert run["first"] > 3.0 and run["last"] < 0.05 and ce < 0.15
    assert uer < 0.12


# --------------------------------------------------------------------- segment positions

def test_segment_positions_voice_the_first_word():
    """Without the synthetic task's lead token the first response token's CTC frames are
    copies of one vector, and the causal RoPE decoder gives them identical outputs: greedy CTC
    says at most one unit of the first word, and a one-word answer ("two", as omni_digits'
    short answers) is lost. SpeechGenConfig.segment_positions gives each frame its place in
    its token's segment. Same budget both ways; held out: unseen word sequences, and one-word
    answers (never trained alone: the training responses have 2-4 words)."""
    task = SyntheticSpeechTask(lead_token=False, min_words=1, max_words=4)
    train_items = task.sample(1024, seed=1, lengths=[2, 3, 4])
    held = {"sequences": task.batch(task.sample(128, seed=2, exclude=train_items), seed=8),
            "one_word": task.batch([((w,), (s,), 1) for w in range(task.num_words)
                                    for s in range(2 if w < task.num_homographs else 1)],
                                   seed=9)}
    uer = {}
    for seg in (False, True):
        cfg = tiny_generator_config(task, "ctc", segment_positions=seg)
        params = train(cfg, 200, {"ctc": 1.0}, task=task, items=train_items)["params"]
        for name, b in held.items():
            uer[seg, name] = ctc_uer(cfg, params["speech"], b, task)
    print("held-out UER (segment_positions, set):", {k: round(v, 4) for k, v in uer.items()})
    # measured (200 steps, seed 0): on 0.6% / 1.1%, off 57.1% / 100% (300 steps: 0 / 0, 39.3 / 100)
    assert uer[True, "sequences"] < 0.03 and uer[True, "one_word"] < 0.05
    assert uer[False, "sequences"] > 0.2 and uer[False, "one_word"] > 0.8
