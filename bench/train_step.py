"""Training-step throughput and MFU: our jitted steps vs transformers + torch.optim.AdamW.

Same Qwen2 config, identical weights (omni_jax.convert.qwen2), same batch, same thread count,
fp32, in the same process; variants are timed round-robin so machine load hits all alike.

    python bench/train_step.py            # widths 256 and 1024, 4 layers, seq 256
    python bench/train_step.py --quick    # tiny smoke run
    python bench/train_step.py --profile jax_fused --widths 256   # top XLA ops of one step

Writes bench/results/train_step.json (--quick: train_step_quick.json) and prints a table.
MFU = 3 x forward FLOPs per token (LLMConfig.flops_per_token) x tokens/s / the best fp32
matmul rate (jax or torch) measured in the same run, before and after the models.
The 1-vs-8 emulated device comparison runs in a subprocess (XLA_FLAGS must be set before jax
is imported).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch's OpenMP workers spin-wait by default; on a shared, oversubscribed CPU that made its
# step ~4x slower (bench/README.md). PASSIVE is torch's best setting here: use it (set before
# torch is imported).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from bench import common  # noqa: E402
from omni_jax.convert.qwen2 import config_from_hf, params_from_hf  # noqa: E402
from omni_jax.llm.decoder import Decoder  # noqa: E402
from omni_jax.train.fused_ce import fused_cross_entropy  # noqa: E402

LR = 1e-4


def hf_config(width: int, layers: int, vocab: int, tied: bool):
    """Qwen2-shaped config: head_dim 64, kv_heads = heads / 4, intermediate ~ 2.75 x width."""
    from transformers import Qwen2Config
    heads = max(width // 64, 1)
    return Qwen2Config(vocab_size=vocab, hidden_size=width,
                       intermediate_size=width * 11 // 4 // 64 * 64, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1),
                       tie_word_embeddings=tied, max_position_embeddings=4096)


def build(width: int, layers: int, vocab: int, tied: bool, seed: int = 0):
    """-> (LLMConfig, torch Qwen2ForCausalLM, our params {"params": ...}) with equal weights."""
    import torch
    from transformers import Qwen2ForCausalLM
    hf = hf_config(width, layers, vocab, tied)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(hf).float()
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    cfg = config_from_hf(hf.to_dict())
    return cfg, model, params_from_hf(cfg, sd)


def make_batch(cfg, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq + 1))
    return {"input_ids": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32)}


# ---- our steps ------------------------------------------------------------------------------
def naive_loss(dec: Decoder):
    def loss(p, b):  # logits -> log_softmax -> gather: the calibration baseline
        logits = dec.apply({"params": p}, b["input_ids"])["logits"]
        lp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(lp, b["targets"][..., None], -1))
    return loss


def fused_loss(dec: Decoder, chunk: int):
    tied = dec.config.tie_word_embeddings

    def loss(p, b):
        hidden = dec.apply({"params": p}, b["input_ids"], compute_logits=False)["hidden"]
        kernel = p["embed"]["embedding"] if tied else p["lm_head"]["kernel"]
        s, n = fused_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), kernel,
                                   b["targets"].reshape(-1), tied=tied, chunk_size=chunk)
        return s / n
    return loss


def minimal_step(loss_fn, params):
    """value_and_grad + optax.adamw, params/opt state donated. -> (step(state, batch), state)."""
    tx = optax.adamw(LR, weight_decay=0.0)

    def step(state, batch):
        p, o = state
        loss, g = jax.value_and_grad(loss_fn)(p, batch)
        u, o = tx.update(g, o, p)
        return (optax.apply_updates(p, u), o), loss

    return jax.jit(step, donate_argnums=0), (params, tx.init(params))


def trainer_step(cfg, params, batch, variant: str, chunk: int, mesh=None):
    """The omni_jax Trainer's step (no clipping, constant LR: the same update as torch)."""
    import ml_collections

    from omni_jax.train.losses import LOSSES
    from omni_jax.train.model import DecoderLM
    from omni_jax.train.trainer import Trainer, default_config
    c = default_config()
    c.batch_size = int(batch["input_ids"].shape[0])
    c.optim.lr, c.optim.clip_norm, c.optim.schedule = LR, 0.0, "constant"
    c.progress_bar = c.tensorboard = False
    losses = dict(LOSSES)
    if variant == "trainer_fused":  # our fused_ce plugged in through the loss registry
        def ce(outputs, b):  # DecoderLM gives lm_head as [embed, vocab] (tied: transposed)
            h = outputs["hidden"]
            s, n = fused_cross_entropy(h.reshape(-1, h.shape[-1]), outputs["lm_head"],
                                       b["targets"].reshape(-1), chunk_size=chunk)
            return s / jnp.maximum(n, 1.0), {"tokens": n}
        losses["ce"] = ce
    elif variant == "trainer_chunked":  # the trainer's own chunked head (losses.py)
        c.stage.losses = ml_collections.ConfigDict({"ce": {"weight": 1.0, "chunk_size": chunk}})
    fused = variant in ("trainer_fused", "trainer_chunked")
    model = DecoderLM(cfg, fused_head_chunk=chunk if fused else None)
    tr = Trainer(c, model, losses=losses, mesh=mesh)
    state = tr.init_state(batch, params=params["params"])
    return (lambda s, b: tr.train_step(s, b)), state, tr


# ---- torch ------------------------------------------------------------------------------------
def torch_step(model, batch):
    import torch
    import torch.nn.functional as F
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    x = torch.from_numpy(batch["input_ids"]).long()
    y = torch.from_numpy(batch["targets"]).long().reshape(-1)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def torch_forward(model, batch):
    import torch
    x = torch.from_numpy(batch["input_ids"]).long()
    return lambda: model(input_ids=x).logits.sum()


def torch_matmul_peak(n: int = 2048) -> float:
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2.0 * n ** 3 / min(common.time_fn(lambda: a @ b, warmup=2, repeats=5))


# ---- runner -----------------------------------------------------------------------------------
JAX_VARIANTS = ("jax_naive", "jax_fused", "trainer", "trainer_chunked", "trainer_fused")


def jax_runner(name: str, cfg, params, batch: dict[str, np.ndarray], chunk: int, mesh=None):
    """-> (run_one_step() blocking, forward_loss() or None)."""
    dec = Decoder(cfg)
    params = jax.tree.map(jnp.array, params)  # fresh buffers: steps donate them
    if name.startswith("trainer"):
        step, state, tr = trainer_step(cfg, params, batch, name, chunk, mesh)
        b = tr.shard(batch)
        fwd = None
    else:
        loss = naive_loss(dec) if name == "jax_naive" else fused_loss(dec, chunk)
        step, state = minimal_step(loss, params["params"])
        b = {k: jnp.asarray(v) for k, v in batch.items()}
        fwd_fn, p0 = jax.jit(loss), jax.tree.map(jnp.array, params["params"])
        fwd = lambda: common.block(fwd_fn(p0, b))  # noqa: E731
    box = [state]

    def run():
        box[0], out = step(box[0], b)
        return common.block(out)
    return run, fwd


def time_variants(fns: dict, repeats: int) -> dict[str, dict]:
    """Compile/warm each, then time round-robin; -> {name: {first_s, times}}."""
    out = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        out[name] = {"first_s": time.perf_counter() - t0, "times": []}
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(0.2)  # let the other framework's spinning worker threads park
            t0 = time.perf_counter()
            fn()
            out[name]["times"].append(time.perf_counter() - t0)
    return out


def run_width(args, width: int, peak: float) -> list[dict]:
    import torch
    cfg, tmodel, params = build(width, args.layers, args.vocab, args.tied)
    batch = make_batch(cfg, args.batch, args.seq)
    steps, fwds = {}, {}
    for name in args.variants:
        if name == "torch":
            steps[name] = torch_step(tmodel, batch)
            fwds[name] = torch_forward(tmodel, batch)
            continue
        steps[name], fwd = jax_runner(name, cfg, params, batch, args.chunk)
        if fwd is not None:
            fwds[name] = fwd
    res = time_variants(steps, args.repeats)
    with torch.no_grad():
        fres = time_variants(fwds, max(args.repeats // 2, 2)) if args.fwd else {}
    tokens = args.batch * args.seq
    flops = 3.0 * cfg.flops_per_token(args.seq) * tokens
    t_ref = min(res["torch"]["times"]) if "torch" in res else None
    rows = []
    for name, r in res.items():
        t = min(r["times"])  # best of the round-robin: background load only ever adds time
        row = {"width": width, "variant": name, "step_ms": 1e3 * t, "tokens/s": tokens / t,
               "MFU": flops / t / peak, "vs_torch": (t_ref / t) if t_ref else float("nan"),
               "median_ms": 1e3 * common.median(r["times"]), "first_s": r["first_s"]}
        if name in fres:
            tf = min(fres[name]["times"])
            row["fwd_ms"], row["step/fwd"] = 1e3 * tf, t / tf
        row["times_ms"] = [round(1e3 * v, 1) for v in r["times"]]
        rows.append(row)
    del tmodel
    return rows


def devices_part(args) -> list[dict]:
    """(Subprocess, 8 emulated devices.) Trainer step with fused CE on 1 vs 8 devices (data)."""
    from omni_jax.parallel.mesh import make_mesh
    cfg, _, params = build(args.widths[0], args.layers, args.vocab, args.tied)
    batch = make_batch(cfg, max(args.batch, 8) // 8 * 8, args.seq)
    meshes = {"1 device": make_mesh({"data": 1}, jax.devices()[:1]),
              f"{jax.device_count()} devices (data)": make_mesh({"data": -1})}
    fns = {k: jax_runner("trainer_fused", cfg, params, batch, args.chunk, m)[0]
           for k, m in meshes.items()}
    res = time_variants(fns, args.repeats)
    tokens = batch["input_ids"].size
    return [{"width": args.widths[0], "devices": k, "batch": batch["input_ids"].shape[0],
             "step_ms": 1e3 * common.median(r["times"]),
             "tokens/s": tokens / common.median(r["times"]), "first_s": r["first_s"]}
            for k, r in res.items()]


def profile(args) -> None:
    """Top XLA ops (summed over worker threads, per step) of one variant's step."""
    from jax._src.lib import _profile_data
    cfg, tmodel, params = build(args.widths[0], args.layers, args.vocab, args.tied)
    del tmodel
    run, _ = jax_runner(args.profile, cfg, params, make_batch(cfg, args.batch, args.seq),
                        args.chunk)
    run(), run()
    d = tempfile.mkdtemp()
    jax.profiler.start_trace(d)
    for _ in range(2):
        run()
    jax.profiler.stop_trace()
    data = _profile_data.ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
    agg = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if "XLAEigen" in line.name:
                for ev in line.events:
                    if not ev.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
                        agg[ev.name] += ev.duration_ns / 2e6
    total = sum(agg.values())
    kinds = collections.Counter()
    for k, v in agg.items():
        kinds[k.rsplit(".", 1)[0] if k.rsplit(".", 1)[-1].isdigit() else k] += v
    print(f"{args.profile} width {args.widths[0]}: {total:.0f} ms of op time per step "
          f"(summed over XLA worker threads)")
    for title, counts in (("by op kind", kinds), ("top ops", agg)):
        print(f"-- {title}")
        for k, v in counts.most_common(args.top):
            print(f"{v:9.1f} ms {100 * v / total:5.1f}%  {k}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--chunk", type=int, default=256, help="fused CE token chunk")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=["torch", "jax_naive", "jax_fused",
                                                     "trainer", "trainer_fused"],
                    choices=("torch", *JAX_VARIANTS))
    ap.add_argument("--no-fwd", dest="fwd", action="store_false", help="skip forward timings")
    ap.add_argument("--no-devices", dest="devices", action="store_false")
    ap.add_argument("--devices-part", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile", choices=JAX_VARIANTS, help="print top XLA ops and exit")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    if args.quick:
        args.widths, args.layers, args.seq, args.batch, args.vocab = [64], 2, 32, 8, 512
        args.repeats, args.chunk = 2, 64
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    if args.devices_part:
        print("JSON" + json.dumps(devices_part(args)))
        return 0
    if args.profile:
        profile(args)
        return 0
    jpeak, tpeak = common.matmul_peak(1024 if args.quick else 2048), torch_matmul_peak()
    peak = max(jpeak, tpeak)  # MFU against the better of the two measured fp32 matmul peaks
    rows = []
    for w in args.widths:
        rows += run_width(args, w, 1.0)
        print(common.format_table(rows[-len(args.variants):],  # MFU needs the final peak
                                  [c for c in COLUMNS if c != "MFU"]), flush=True)
    # load moves the ceiling too: re-measure after the models and use the best of all
    jpeak = max(jpeak, common.matmul_peak(1024 if args.quick else 2048))
    tpeak = max(tpeak, torch_matmul_peak())
    peak = max(jpeak, tpeak)
    for r in rows:
        r["MFU"] /= peak
    dev_rows = []
    if args.devices:
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                                           " --xla_force_host_platform_device_count=8"))
        cmd = [sys.executable, os.path.abspath(__file__), "--devices-part",
               *(sys.argv[1:] if argv is None else argv)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        dev_rows = json.loads(out.split("JSON", 1)[1])
    result = {"config": {k: v for k, v in vars(args).items() if k != "profile"},
              "vocab": args.vocab, "peak_flops_jax": jpeak, "peak_flops_torch": tpeak,
              "torch_threads": torch.get_num_threads(), "machine": common.machine_info(),
              "rows": rows, "devices": dev_rows}
    path = common.write_json("train_step_quick" if args.quick else "train_step", result)
    print(f"\nfp32 matmul peak: jax {jpeak / 1e9:.1f} GFLOP/s, torch {tpeak / 1e9:.1f} GFLOP/s; "
          f"vocab {args.vocab}, batch {args.batch} x seq {args.seq}, {args.layers} layers")
    print(common.format_table(rows, COLUMNS))
    if dev_rows:
        print()
        print(common.format_table(dev_rows))
    print(f"\nwrote {path}")
    return 0


COLUMNS = ["width", "variant", "step_ms", "median_ms", "tokens/s", "MFU", "vs_torch", "fwd_ms",
           "step/fwd", "first_s"]

if __name__ == "__main__":
    sys.exit(main())
