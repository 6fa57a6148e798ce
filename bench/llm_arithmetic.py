"""Can the demo's from-scratch LLM learn the sums omni_digits' video questions ask, from text?

The demo recipe's video stage reads 3-5 digit frames well (count / first / last / order) but
its sums stay at the most frequent answer: a from-scratch 4-layer LLM does not know addition,
which a pretrained one brings. This measures what teaching it costs: the demo LLM
(omni_jax/configs/models/demo.py, random init) trained on "What is three plus four plus
eight?" -> "three plus four plus eight is fifteen" (loss on the sum's tokens only; the demo
run's sentencepiece tokenizer), exact match of the sum (teacher-forced argmax) on held-out
problems: every ordered tuple of 3-5 digits whose index mod 10 is 0 is never trained on.

    .venv/bin/python bench/llm_arithmetic.py --tokenizer runs/demo/data/spm.model \\
        [--steps 1200] [--batch 64]        # -> bench/results/llm_arithmetic.json

Measured (2 cores, 2026-12-07, a full demo run's tokenizer; bench/README.md): 95.2% held out after
64 x 1,200 steps (257 s).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine_info, write_json  # noqa: E402
from omni_jax.configs.models.demo import LLM  # noqa: E402
from omni_jax.data.omni_digits.tasks import DIGIT_WORDS, number_words  # noqa: E402
from omni_jax.llm.config import LLMConfig  # noqa: E402
from omni_jax.llm.decoder import Decoder  # noqa: E402

SEQ = 40


def problems(sp) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ordered 3-5 digit tuple -> (ids [n, SEQ], target mask [n, SEQ], held_out [n])."""
    tuples = [t for n in (3, 4, 5) for t in itertools.product(range(10), repeat=n)]
    ids = np.zeros((len(tuples), SEQ), np.int32)
    mask = np.zeros((len(tuples), SEQ), np.float32)
    for i, t in enumerate(tuples):
        ops = " plus ".join(DIGIT_WORDS[d] for d in t)
        total = sp.encode(number_words(sum(t)))
        seq = sp.encode(f"What is {ops}?") + sp.encode(f"{ops} is ") + total
        if len(seq) > SEQ:
            raise ValueError(f"problem {t} is {len(seq)} tokens, more than {SEQ}")
        ids[i, :len(seq)] = seq
        mask[i, len(seq) - len(total) - 1:len(seq) - 1] = 1.0  # positions predicting the sum
    return ids, mask, np.arange(len(tuples)) % 10 == 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default="runs/demo/data/spm.model")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--evals", type=int, default=4, help="evaluations over the run")
    a = ap.parse_args(argv)
    if not os.path.isfile(a.tokenizer):
        raise ValueError(f"--tokenizer {a.tokenizer!r} is not a file; expected a demo run's "
                         f"sentencepiece model (runs/demo/data/spm.model after make demo)")
    if a.steps < a.evals or a.batch < 1:
        raise ValueError(f"--steps must be >= --evals and --batch >= 1, got {a.steps} / "
                         f"{a.batch}")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=a.tokenizer)
    ids, mask, held = problems(sp)
    train, test = np.flatnonzero(~held), np.flatnonzero(held)
    model = Decoder(LLMConfig.from_dict(dict(LLM)))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, SEQ), jnp.int32))
    sched = optax.warmup_cosine_decay_schedule(0.0, a.lr, max(1, a.steps // 20), a.steps)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0))
    state = opt.init(params)

    def loss_fn(p, x, m):
        logits = model.apply(p, x)["logits"][:, :-1]  # [batch, seq - 1, vocab]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:])
        return (ce * m[:, :-1]).sum() / m.sum(), logits

    @jax.jit
    def step(p, s, x, m):
        (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, m)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    @jax.jit
    def exact(p, x, m):
        _, logits = loss_fn(p, x, m)
        ok = (logits.argmax(-1) == x[:, 1:]) | (m[:, :-1] == 0)
        return ok.all(-1).sum()

    def accuracy(p) -> float:
        hits = sum(int(exact(p, ids[test[i:i + 1024]], mask[test[i:i + 1024]]))
                   for i in range(0, len(test), 1024))
        return hits / len(test)

    rng, curve, t0 = np.random.default_rng(0), [], time.time()
    for i in range(a.steps):
        b = rng.choice(train, a.batch)
        params, state, loss = step(params, state, ids[b], mask[b])
        if (i + 1) % (a.steps // a.evals) == 0 or i + 1 == a.steps:
            curve.append({"step": i + 1, "loss": round(float(loss), 4),
                          "held_out_exact": round(accuracy(params), 4),
                          "seconds": round(time.time() - t0, 1)})
            print(curve[-1], flush=True)
    out = {"bench": "llm_arithmetic", "llm": dict(LLM), "tokenizer": a.tokenizer,
           "steps": a.steps, "batch": a.batch, "lr": a.lr, "train_problems": int(len(train)),
           "held_out_problems": int(len(test)), "curve": curve, "machine": machine_info()}
    print(f"wrote {write_json('llm_arithmetic', out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
