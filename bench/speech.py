"""Speech generator speed: JAX vs the PyTorch reference, NAR / AR unit rates, first audio chunk.

Forward: our jitted SpeechGenerator CTC forward (fp32) vs tests/speech/torch_ref.py's
TorchSpeechGenerator (transformers Qwen2, eager; imported by adding tests/speech to sys.path)
with the same weights, copied through omni_jax.convert.openomni. Best-of-N interleaved with a
2048^3 fp32 matmul, which gives the peak for MFU in the same run. NAR: one response, batch 1,
forward + greedy CTC decode; RTF = time / audio seconds at --frame-rate units/s, counting
--units-per-token units per response token (a random generator's decoded length means
nothing). AR: greedy KV-cache loop (ar_prefill + ar_step in lax.fori_loop, EOS masked so
exactly --ar-units units), its weight bytes per unit against a copy bandwidth measured
in the same run. First chunk: the response split into --sentences sentences, each
through the generator and a MelTableVocoder (fitted on synthetic audio); first = sentence 1,
full = all of them in sequence.

  python bench/speech.py            # tiny and paper shapes (~5 min on 2 cores)
  python bench/speech.py --quick    # tiny only, smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/llm_forward.py
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "speech"))  # torch_ref: the PyTorch reference

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch_ref import TorchSpeechGenerator  # noqa: E402

from bench.common import (  # noqa: E402
    copy_probe,
    format_table,
    machine_info,
    matmul_probe,
    time_fn,
    time_interleaved,
    write_json,
)
from omni_jax.convert.openomni import params_from_openomni  # noqa: E402
from omni_jax.speech.config import SpeechGenConfig, speech_preset  # noqa: E402
from omni_jax.speech.generator import SpeechGenerator, speech_cache  # noqa: E402
from omni_jax.speech.units import UnitConfig, UnitTokenizer  # noqa: E402
from omni_jax.speech.vocoder import MelTableVocoder, VocoderConfig  # noqa: E402

NAMES = ("hidden", "row_mask", "text_ids", "text_mask")


def forward_flops(c: SpeechGenConfig, rows: int, tokens: int) -> float:
    """FLOPs of one item's CTC forward (2 x MACs): expansion, fusion, decoder, unit head."""
    n, hh, frames = c.width, c.fusion_heads * c.fusion_head_dim, c.upsample * tokens
    f, keys = c.expansion * n, c.expansion * (rows + 2)
    mix = c.num_experts if c.moe == "soft" else 1
    moe = (rows + 2) * mix * (c.llm_hidden * c.expert_hidden + c.expert_hidden * f)
    fusion = c.fusion_layers * (tokens * (2 * n * hh + 2 * c.fusion_ff_mult * n * n)
                                + keys * 2 * n * hh + 2 * tokens * keys * hh)
    d = c.decoder
    dec = d.flops_per_token(frames) / 2 - d.hidden_size * d.vocab_size  # no LM head
    return 2.0 * (moe + fusion + frames * (dec + n * c.num_outputs))


def make_batch(c: SpeechGenConfig, b: int, rows: int, tokens: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"hidden": rng.standard_normal((b, rows, c.llm_hidden)).astype(np.float32),
            "row_mask": np.ones((b, rows), bool),
            "text_ids": rng.integers(0, c.decoder.vocab_size, (b, tokens)).astype(np.int32),
            "text_mask": np.ones((b, tokens), bool)}


def ctc_greedy(log_probs: np.ndarray, blank: int) -> np.ndarray:
    """Standard CTC decoding of one item: argmax, collapse repeats, drop blanks."""
    best = log_probs.argmax(-1)
    keep = np.r_[True, best[1:] != best[:-1]] & (best != blank)
    return best[keep]


def bench_forward(c: SpeechGenConfig, args: argparse.Namespace, mm, mm_flops) -> tuple:
    """JAX vs torch CTC forward at [batch, rows] x [batch, tokens]; returns (row, params)."""
    torch.manual_seed(0)
    ref = TorchSpeechGenerator(c).eval()
    params = jax.device_put(params_from_openomni(c, ref.state_dict(), prefix=""))
    batch = make_batch(c, args.batch, args.rows, args.tokens)
    fwd = jax.jit(lambda p, *a: SpeechGenerator(c).apply(p, *a)["speech_log_probs"])
    ja, ta = [jnp.asarray(batch[k]) for k in NAMES], [torch.tensor(batch[k]) for k in NAMES]
    with torch.no_grad():
        t = time_interleaved({"jax": lambda: fwd(params, *ja),
                              "torch": lambda: ref(*ta)["speech_log_probs"], "peak": mm},
                             warmup=1, repeats=args.repeats)
        err = float(np.abs(np.asarray(fwd(params, *ja)) - ref(*ta)["speech_log_probs"].numpy())
                    .max())
    flops = args.batch * forward_flops(c, args.rows, args.tokens)
    peak = mm_flops / min(t["peak"])
    jx, tx = min(t["jax"]), min(t["torch"])
    return {"jax_ms": 1e3 * jx, "torch_ms": 1e3 * tx, "jax_x": tx / jx,
            "gflop": flops / 1e9, "jax_mfu": flops / jx / peak, "torch_mfu": flops / tx / peak,
            "peak_gflops": peak / 1e9, "max_abs_err": err}, params


def bench_nar(c: SpeechGenConfig, params, args: argparse.Namespace) -> tuple[dict, dict]:
    """Batch-1 response: forward + greedy decode; plus the jitted generate fn for streaming."""
    fwd = jax.jit(lambda p, *a: jnp.argmax(SpeechGenerator(c).apply(p, *a)["speech_log_probs"],
                                           -1))

    def generate(batch):
        frames = np.asarray(fwd(params, *(jnp.asarray(batch[k]) for k in NAMES)))[0]
        keep = np.r_[True, frames[1:] != frames[:-1]] & (frames != c.unit_vocab)
        return frames, frames[keep]

    one = make_batch(c, 1, args.rows, args.tokens, seed=1)
    t = min(time_fn(lambda: generate(one), warmup=1, repeats=args.repeats))
    audio_s = args.tokens * args.units_per_token / args.frame_rate
    frames_s = c.upsample * args.tokens / args.frame_rate
    return {"nar_ms": 1e3 * t, "nar_units_s": audio_s * args.frame_rate / t,
            "nar_rtf": t / audio_s, "nar_rtf_all_frames": t / frames_s}, {"generate": generate}


def bench_ar(c: SpeechGenConfig, args: argparse.Namespace) -> dict:
    """Greedy AR decoding with the KV cache, batch 1, exactly args.ar_units units."""
    model, n = SpeechGenerator(c), args.ar_units
    one = make_batch(c, 1, args.rows, args.tokens, seed=2)
    a = [jnp.asarray(one[k]) for k in NAMES]
    units = jnp.zeros((1, 3), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), *a, units, jnp.ones((1, 3), bool))
    max_len = args.tokens + 2 + n

    @jax.jit
    def run(p, hidden, row_mask, text_ids, text_mask):
        cache = speech_cache(c, 1, max_len)
        logits, cache, pos = model.apply(p, hidden, row_mask, text_ids, text_mask, cache,
                                         method=SpeechGenerator.ar_prefill)

        def body(i, st):
            logits, cache, pos, out = st
            u = jnp.argmax(logits[:, :c.unit_vocab], -1).astype(jnp.int32)  # EOS masked
            logits, cache = model.apply(p, u, pos, cache, method=SpeechGenerator.ar_step)
            return logits, cache, pos + 1, out.at[:, i].set(u)

        init = (logits, cache, pos, jnp.zeros((1, n), jnp.int32))
        return jax.lax.fori_loop(0, n, body, init)[3]

    cp, cp_bytes = copy_probe()
    t = time_interleaved({"ar": lambda: run(params, *a), "copy": cp}, warmup=1,
                         repeats=args.repeats)
    ar, bw = min(t["ar"]), cp_bytes / min(t["copy"])
    d = c.decoder  # weights read per unit: the decoder but its token table, and the unit head
    step_bytes = 4 * (d.num_params() - d.vocab_size * d.hidden_size * (2 - d.tie_word_embeddings)
                      + (c.width + 1) * c.num_outputs)
    return {"ar_units_s": n / ar, "ar_rtf": ar / (n / args.frame_rate),
            "ar_bw_use": step_bytes * n / ar / bw, "copy_gb_s": bw / 1e9}


def fit_vocoder(c: SpeechGenConfig, args: argparse.Namespace) -> MelTableVocoder:
    """A MelTableVocoder on synthetic harmonic sweeps; its table tiled to the unit vocab (the
    synthesis cost depends on the frame count, not on the vocab)."""
    sr, rng = 16000, np.random.default_rng(0)
    tsec = np.arange(3 * sr) / sr
    wavs = []
    for f0 in (110.0, 160.0, 220.0):
        pitch = f0 * (1 + 0.3 * np.sin(2 * np.pi * 0.5 * tsec))
        phase = 2 * np.pi * np.cumsum(pitch) / sr
        w = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(3 * tsec))
        wavs.append((0.3 * w + 0.01 * rng.standard_normal(tsec.size)).astype(np.float32))
    tok = UnitTokenizer.fit(wavs, UnitConfig(vocab_size=args.vocoder_units, sample_rate=sr,
                                             frame_rate=args.frame_rate, kmeans_iters=10))
    voc = MelTableVocoder.fit(tok, wavs, VocoderConfig())
    reps = -(-c.unit_vocab // voc.vocab_size)
    return MelTableVocoder(np.tile(voc.table, (reps, 1))[:c.unit_vocab],
                           np.tile(voc.counts, reps)[:c.unit_vocab], voc.config, sr,
                           args.frame_rate)


def vocoder_units(frames: np.ndarray, count: int, vocab: int) -> np.ndarray:
    """`count` units from the greedy frames (evenly sampled, blank mapped into range): the
    vocoder's work is then that of a trained generator's output."""
    idx = np.linspace(0, len(frames) - 1, count).astype(int)
    return np.minimum(frames[idx], vocab - 1)


def bench_stream(c: SpeechGenConfig, generate, vocoder, args: argparse.Namespace) -> dict:
    """Per-sentence generator + vocoder: first chunk latency vs the full spoken response."""
    k = args.sentences
    s_tok, s_rows = args.tokens // k, args.rows // k
    whole = make_batch(c, 1, s_rows * k, s_tok * k, seed=3)
    parts = [{n: whole[n][:, i * (s_rows if n in ("hidden", "row_mask") else s_tok):
                          (i + 1) * (s_rows if n in ("hidden", "row_mask") else s_tok)]
              for n in NAMES} for i in range(k)]
    per_unit = round(s_tok * args.units_per_token)

    def speak(batch, tokens):
        frames, _ = generate(batch)
        return vocoder(vocoder_units(frames, round(tokens * args.units_per_token),
                                     c.unit_vocab))

    speak(parts[0], s_tok)  # compile the sentence shape
    best_first, best_full = np.inf, np.inf
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        speak(parts[0], s_tok)
        first = time.perf_counter() - t0
        for p in parts[1:]:
            speak(p, s_tok)
        best_first, best_full = min(best_first, first), min(best_full, time.perf_counter() - t0)
    voc = min(time_fn(lambda: vocoder(np.zeros(per_unit, np.int64)), warmup=0, repeats=2))
    return {"first_chunk_ms": 1e3 * best_first, "full_ms": 1e3 * best_full,
            "first_frac": best_first / best_full, "vocoder_ms_per_sentence": 1e3 * voc,
            "audio_s": k * per_unit / args.frame_rate}


def bench_size(size: str, args: argparse.Namespace, mm, mm_flops) -> dict:
    h = args.llm_hidden if size == "paper" else args.tiny_hidden
    c = speech_preset(size, h, "ctc")
    row = {"size": size, "llm_hidden": h, "width": c.width, "layers": c.decoder.num_layers,
           "unit_vocab": c.unit_vocab, "batch": args.batch, "rows": args.rows,
           "tokens": args.tokens, "frames": c.upsample * args.tokens}
    t0 = time.perf_counter()
    fwd, params = bench_forward(c, args, mm, mm_flops)
    nar, fns = bench_nar(c, params, args)
    stream = bench_stream(c, fns["generate"], fit_vocoder(c, args), args)
    del params, fns
    ar = bench_ar(speech_preset(size, h, "ar"), args)
    return {**row, **fwd, **nar, **ar, **stream, "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,paper", help="speech_preset names")
    ap.add_argument("--llm-hidden", type=int, default=896, help="H of the paper-shaped run "
                    "(the release's 3584 only widens the expansion's input)")
    ap.add_argument("--tiny-hidden", type=int, default=64, help="H of the tiny run")
    ap.add_argument("--batch", type=int, default=2, help="forward batch")
    ap.add_argument("--rows", type=int, default=60, help="LLM hidden rows per item")
    ap.add_argument("--tokens", type=int, default=40, help="response tokens per item")
    ap.add_argument("--frame-rate", type=int, default=25, help="units per second of audio "
                    "(CosyVoice: 25)")
    ap.add_argument("--units-per-token", type=float, default=7.5,
                    help="units per response token for RTF: 25 units/s / ~3.3 tokens/s")
    ap.add_argument("--ar-units", type=int, default=64, help="units per AR generation")
    ap.add_argument("--sentences", type=int, default=4, help="sentences of the response")
    ap.add_argument("--vocoder-units", type=int, default=64, help="k-means units of the "
                    "synthetic vocoder before tiling")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny only, 2 repeats")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/"
                    "speech[_quick].json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = "tiny", 2
    torch.set_num_threads(os.cpu_count() or 1)
    load = machine_info().get("loadavg_1m_5m_15m")
    mm, mm_flops = matmul_probe()
    rows = [bench_size(s, args, mm, mm_flops) for s in args.sizes.split(",")]
    print(f"torch threads {torch.get_num_threads()}; load at start {load}; fp32; best of "
          f"{args.repeats}")
    print(format_table(rows, ["size", "batch", "frames", "jax_ms", "torch_ms", "jax_x", "gflop",
                              "jax_mfu", "torch_mfu", "peak_gflops", "max_abs_err"]))
    print(format_table(rows, ["size", "nar_ms", "nar_units_s", "nar_rtf", "ar_units_s",
                              "ar_rtf", "ar_bw_use", "first_chunk_ms", "full_ms", "first_frac",
                              "vocoder_ms_per_sentence"]))
    result = {"args": vars(args), "machine": {**machine_info(), "loadavg_at_start": load},
              "targets": {"jax_x": ">= 1.2", "first_frac": "<= 0.25",
                          "nar_rtf (paper)": "< 1"}, "rows": rows}
    out = args.out or os.path.join(ROOT, "bench", "results",
                                   "speech_quick.json" if args.quick else "speech.json")
    name = os.path.splitext(os.path.basename(out))[0]
    print("wrote", write_json(name, result, os.path.dirname(os.path.abspath(out))))
    return result


if __name__ == "__main__":
    main()
