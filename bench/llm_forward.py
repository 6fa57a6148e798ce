"""LLM prefill and decode speed: our jitted Decoder / generate vs transformers' Qwen2 (CPU).

Same config and same random weights in both frameworks (HF model copied with our converter).
Prefill: one forward over [batch, seq] tokens with full logits, ours jitted vs HF eager
(torch.no_grad, fp32, same thread count). Decode: greedy generation at batch 1 of
--new-tokens tokens after a short prompt, our generate vs HF generate. Reports ratios, prefill
MFU against a matmul peak measured in the same run, and decode weight-bandwidth use against a
copy bandwidth measured in the same run.

  python bench/llm_forward.py            # widths 256 and 1024, 4 layers, seq 512, vocab 32000
  python bench/llm_forward.py --quick    # tiny smoke run
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# torch's OpenMP threads spin-wait by default; on a shared, oversubscribed machine that makes
# HF collapse (tens of x slower) and the ratios meaningless. Passive waiting keeps it sane.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _threads_from_argv(argv: list[str]) -> int:
    """--threads must act before jax is imported (XLA reads its flags once)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads", type=int, default=0)
    return pre.parse_known_args(argv)[0].threads


if __name__ == "__main__" and _threads_from_argv(sys.argv[1:]) == 1:
    # One thread in both frameworks: XLA's Eigen pool off, torch set below. On a shared,
    # oversubscribed machine this avoids thread-pool spin/barrier collapse (torch's OpenMP
    # suffers worst), so the ratio measures the kernels rather than the scheduler.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from bench.common import (  # noqa: E402
    copy_probe,
    format_table,
    machine_info,
    matmul_probe,
    median,
    paired_ratio,
    time_interleaved,
    write_json,
)
from omni_jax.convert.qwen2 import config_from_hf, params_from_hf  # noqa: E402
from omni_jax.infer.generate import generate  # noqa: E402
from omni_jax.llm import Decoder, LLMConfig  # noqa: E402


def hf_config(width: int, args: argparse.Namespace) -> Qwen2Config:
    """Qwen2-like shape: head_dim 64, 2 KV heads (as Qwen2-0.5B/1.5B), MLP ~5.5x width."""
    heads = max(1, width // 64)
    return Qwen2Config(
        vocab_size=args.vocab, hidden_size=width, intermediate_size=(width * 11 // 2) // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=heads,
        num_key_value_heads=min(2, heads), tie_word_embeddings=False,
        max_position_embeddings=max(args.seq, args.prompt + args.new_tokens),
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        attn_implementation="sdpa")


def decode_weight_bytes(c: LLMConfig, itemsize: int) -> int:
    """Weights streamed per decoded token: all but the embedding table (one row is read)."""
    return (c.num_params() - c.vocab_size * c.hidden_size) * itemsize


def bench_width(width: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(hf_config(width, args)).eval()
    cfg = config_from_hf(hf.config.to_dict())
    params = params_from_hf(cfg, {k: v.numpy() for k, v in hf.state_dict().items()})
    params = jax.device_put(params)
    model = Decoder(cfg)
    rng = np.random.default_rng(0)
    row = {"width": width, "params_M": cfg.num_params() / 1e6}
    # Ceilings are timed in alternation with the contenders (same load): matmul peak for
    # prefill MFU, in-place copy bandwidth for decode weight-bandwidth use.
    mm, mm_flops = matmul_probe()
    cp, cp_bytes = copy_probe()

    # Prefill: full-sequence forward with logits for every position, both sides.
    ids = rng.integers(0, args.vocab, size=(args.batch, args.seq))
    fwd = jax.jit(lambda p, x: model.apply(p, x)["logits"])
    jids, tids = jnp.asarray(ids, jnp.int32), torch.tensor(ids)
    with torch.no_grad():
        t = time_interleaved({"ours": lambda: fwd(params, jids),
                              "hf": lambda: hf(input_ids=tids).logits, "peak": mm},
                             warmup=2, repeats=args.repeats)
        ours, ref = median(t["ours"]), median(t["hf"])
        err = float(np.abs(np.asarray(fwd(params, jids)) - hf(input_ids=tids).logits.numpy()).max())
    tokens = args.batch * args.seq
    flops = cfg.flops_per_token(args.seq) * tokens
    row.update(prefill_tok_s=tokens / ours, hf_prefill_tok_s=tokens / ref, prefill_x=ref / ours,
               prefill_mfu=paired_ratio(flops, t["ours"], mm_flops, t["peak"]),
               hf_prefill_mfu=paired_ratio(flops, t["hf"], mm_flops, t["peak"]),
               peak_gflops=mm_flops / median(t["peak"]) / 1e9, prefill_max_abs_err=err)

    # Decode: greedy, batch 1, short prompt, every run generates exactly new_tokens tokens.
    dparams = params
    if args.decode_dtype != "float32":
        dparams = jax.tree.map(lambda a: a.astype(args.decode_dtype), params)
        model = Decoder(cfg.replace(dtype=args.decode_dtype, param_dtype=args.decode_dtype))
    prompt = rng.integers(0, args.vocab, size=(1, args.prompt))
    jp = jnp.asarray(prompt, jnp.int32)
    gen = lambda: generate(model, dparams, jp, max_new_tokens=args.new_tokens,
                           cache_dtype=args.decode_dtype)["tokens"]
    tp = torch.tensor(prompt)
    hf_gen = lambda: hf.generate(input_ids=tp, attention_mask=torch.ones_like(tp),
                                 do_sample=False, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, pad_token_id=0,
                                 eos_token_id=None)
    with torch.no_grad():
        t = time_interleaved({"ours": gen, "hf": hf_gen, "copy": cp}, warmup=1,
                             repeats=max(1, args.repeats // 2 + 1))
        ours, ref = median(t["ours"]), median(t["hf"])
        same = float(np.mean(np.asarray(gen()) == hf_gen()[:, args.prompt:].numpy()))
    n = args.new_tokens
    wbytes = decode_weight_bytes(cfg, jnp.dtype(args.decode_dtype).itemsize)
    row.update(decode_tok_s=n / ours, hf_decode_tok_s=n / ref, decode_x=ref / ours,
               decode_bw_use=paired_ratio(wbytes * n, t["ours"], cp_bytes, t["copy"]),
               hf_decode_bw_use=paired_ratio(decode_weight_bytes(cfg, 4) * n, t["hf"], cp_bytes,
                                             t["copy"]),
               copy_gb_s=cp_bytes / median(t["copy"]) / 1e9,
               greedy_tokens_equal=same)
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="256,1024", help="comma-separated hidden sizes")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512, help="prefill length")
    ap.add_argument("--batch", type=int, default=1, help="prefill batch")
    ap.add_argument("--vocab", type=int, default=32000, help="32000 = Llama/Mistral-size vocab")
    ap.add_argument("--prompt", type=int, default=16, help="decode prompt length")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0,
                    help="threads for both frameworks: 0 = all cores, 1 = single-threaded")
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    ap.add_argument("--name", default="llm_forward", help="bench/results/<name>.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.widths, args.layers, args.seq, args.vocab = "64", 2, 64, 1000
        args.new_tokens, args.repeats = 16, 2
    if args.threads not in (0, 1):
        raise ValueError("--threads must be 0 (all cores) or 1")
    torch.set_num_threads(1 if args.threads == 1 else (os.cpu_count() or 1))
    load_start = machine_info().get("loadavg_1m_5m_15m")
    rows = [bench_width(int(w), args) for w in args.widths.split(",")]
    cols = ["width", "params_M", "prefill_tok_s", "hf_prefill_tok_s", "prefill_x", "prefill_mfu",
            "hf_prefill_mfu", "decode_tok_s", "hf_decode_tok_s", "decode_x", "decode_bw_use",
            "hf_decode_bw_use", "peak_gflops", "copy_gb_s", "greedy_tokens_equal"]
    print(f"torch threads {torch.get_num_threads()}; XLA_FLAGS {os.environ.get('XLA_FLAGS', '')!r}"
          f"; decode dtype {args.decode_dtype}; load at start {load_start}")
    print(format_table(rows, cols))
    result = {"args": vars(args),
              "machine": {**machine_info(), "loadavg_at_start": load_start}, "rows": rows}
    print("wrote", write_json(args.name, result))
    return result


if __name__ == "__main__":
    main()
