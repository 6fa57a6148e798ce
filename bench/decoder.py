"""Diffusion image decoder speed: DDIM sampling images/s and the training step, JAX vs PyTorch.

Same DiT config and weights on both sides: tests/decoders/torch_dit_ref.py's TorchDiT (eager,
under no_grad for sampling) mapped with its to_flax_params into omni_jax's DiT. Sampling:
`ddim_sample` (one jitted lax.fori_loop, guidance on: conditional + null in one doubled batch)
vs a Python loop of the same DDIM update in torch, at each --steps count, from the same x_T.
Training: jitted value_and_grad(diffusion_loss) + optax.adam (params / state donated) vs the same
loss in torch (random t, noise, CFG dropout, MSE) + torch.optim.Adam. Every contender is timed
interleaved with a 2048^3 fp32 matmul (jax), whose best rate is the peak for MFU in the same
run. FLOPs from DecoderConfig.flops_per_image (x 2 per guided step, x 3 per training step).

  python bench/decoder.py             # 32x32x3 patch 4, width 256, 4 layers (~2 min, 2 cores)
  python bench/decoder.py --small     # 16x16x3, width 64, 2 layers (smoke run, ~1 min)
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/llm_forward.py
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "decoders"))  # torch_dit_ref: the reference

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from torch_dit_ref import TorchDiT, to_flax_params  # noqa: E402

from bench.common import (  # noqa: E402
    format_table,
    machine_info,
    matmul_probe,
    time_interleaved,
    write_json,
)
from omni_jax.decoders import (  # noqa: E402
    DecoderConfig,
    alphas_cumprod,
    ddim_sample,
    decoder_apply_fn,
    diffusion_loss,
)
from omni_jax.decoders.diffusion import ddim_timesteps  # noqa: E402

SIZES = {
    "small": dict(image_size=16, channels=3, patch_size=2, hidden=64, layers=2, heads=4,
                  cond_dim=64, cond_len=8),
    "base": dict(image_size=32, channels=3, patch_size=4, hidden=256, layers=4, heads=8,
                 cond_dim=256, cond_len=32),
}


def make_inputs(c: DecoderConfig, b: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.uniform(-1, 1, (b, *c.image_shape)).astype(np.float32),
            "cond": rng.standard_normal((b, c.cond_len, c.cond_dim)).astype(np.float32),
            "mask": np.arange(c.cond_len)[None] < rng.integers(1, c.cond_len + 1, b)[:, None]}


def torch_ddim(model: TorchDiT, c: DecoderConfig, x: torch.Tensor, cond: torch.Tensor,
               mask: torch.Tensor, steps: int, scale: float) -> torch.Tensor:
    """DDIM (eta 0, diffusers' step) with classifier-free guidance, a doubled batch per step."""
    acp = torch.tensor(alphas_cumprod(c), dtype=torch.float32)
    b = x.shape[0]
    cond2, mask2 = torch.cat([cond, cond]), torch.cat([mask, mask])
    drop2 = torch.arange(2 * b) >= b
    ts, prev = ddim_timesteps(c, steps)
    for t, tp in zip(ts.tolist(), prev.tolist()):
        out = model(torch.cat([x, x]), torch.full((2 * b,), t), cond2, mask2, drop2)
        out = out[b:] + scale * (out[:b] - out[b:])
        a, ap = acp[t], acp[tp] if tp >= 0 else torch.tensor(1.0)
        x0 = ((x - (1 - a).sqrt() * out) / a.sqrt()).clamp(-c.clip_range, c.clip_range)
        x = ap.sqrt() * x0 + (1 - ap).sqrt() * out
    return x


def torch_train_step(model: TorchDiT, opt: torch.optim.Optimizer, c: DecoderConfig,
                     acp: torch.Tensor, x0, cond, mask) -> torch.Tensor:
    """The diffusion_loss math (epsilon target) in torch, backward, Adam step."""
    b = x0.shape[0]
    t = torch.randint(0, c.num_train_timesteps, (b,))
    noise = torch.randn_like(x0)
    drop = torch.rand(b) < c.cfg_dropout
    a = acp[t][:, None, None, None]
    loss = ((model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, cond, mask, drop) - noise) ** 2
            ).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def bench_size(size: str, args: argparse.Namespace, mm, mm_flops: float) -> list[dict]:
    c = DecoderConfig(**SIZES[size])
    torch.manual_seed(0)
    ref = TorchDiT(c)
    with torch.no_grad():  # non-zero adaLN / final layer, so the outputs mean something
        for p in ref.parameters():
            p.copy_(0.05 * torch.randn_like(p))
    params = jax.device_put(to_flax_params(ref, c))
    apply = decoder_apply_fn(c)
    b, fl = args.batch, c.flops_per_image()
    inp = make_inputs(c, b)
    j = {k: jnp.asarray(v) for k, v in inp.items()}
    tt = {k: torch.tensor(v) for k, v in inp.items()}
    rows = []
    with torch.no_grad():  # forward agreement on the same weights
        t_ = np.full(b, c.num_train_timesteps // 2, np.int32)
        err = float(np.abs(np.asarray(jax.jit(apply)(params, j["x"], t_, j["cond"], j["mask"]))
                           - ref(tt["x"].permute(0, 3, 1, 2), torch.tensor(t_), tt["cond"],
                                 tt["mask"]).permute(0, 2, 3, 1).numpy()).max())
    key = jax.random.key(0)
    x_t = torch.tensor(np.asarray(jax.random.normal(jax.random.split(key)[0],
                                                    (b, *c.image_shape))))
    for steps in args.steps:
        fns = {"jax": lambda s=steps: ddim_sample(apply, params, j["cond"], j["mask"], key, s,
                                                  args.guidance, config=c),
               "torch": lambda s=steps: torch_ddim(ref, c, x_t.permute(0, 3, 1, 2),
                                                   tt["cond"], tt["mask"], s, args.guidance),
               "peak": mm}
        with torch.no_grad():
            t = time_interleaved(fns, warmup=1, repeats=args.repeats)
            diff = float(np.abs(np.asarray(fns["jax"]()) -
                                fns["torch"]().permute(0, 2, 3, 1).numpy()).max())
        work = steps * 2 * b * fl
        rows.append(row(size, f"ddim{steps}", b, t, work, mm_flops,
                        {"jax_img_s": b / min(t["jax"]), "torch_img_s": b / min(t["torch"]),
                         "max_abs_err": diff}))
    # training step
    opt = optax.adam(1e-4)

    def jstep(p, s, x, cond, mask, k):
        loss, g = jax.value_and_grad(
            lambda p: diffusion_loss(apply, p, x, cond, mask, k, config=c))(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    jstep = jax.jit(jstep, donate_argnums=(0, 1))
    state = {"p": jax.tree.map(jnp.array, params)}
    state["s"] = opt.init(state["p"])
    state["i"] = 0

    def run_jax():
        state["i"] += 1
        state["p"], state["s"], loss = jstep(state["p"], state["s"], j["x"], j["cond"],
                                             j["mask"], jax.random.key(state["i"]))
        return loss

    topt = torch.optim.Adam(ref.parameters(), lr=1e-4)
    acp = torch.tensor(alphas_cumprod(c), dtype=torch.float32)
    xt = tt["x"].permute(0, 3, 1, 2).contiguous()
    t = time_interleaved({"jax": run_jax, "torch": lambda: torch_train_step(
        ref, topt, c, acp, xt, tt["cond"], tt["mask"]).detach(), "peak": mm},
        warmup=1, repeats=args.repeats)
    rows.append(row(size, "train_step", b, t, 3 * b * fl, mm_flops,
                    {"max_abs_err": err}))
    return rows


def row(size: str, what: str, b: int, t: dict, work: float, mm_flops: float,
        extra: dict) -> dict:
    jx, tx, peak = min(t["jax"]), min(t["torch"]), mm_flops / min(t["peak"])
    return {"size": size, "what": what, "batch": b, "jax_ms": 1e3 * jx, "torch_ms": 1e3 * tx,
            "jax_x": tx / jx, "gflop": work / 1e9, "jax_gflops": work / jx / 1e9,
            "jax_mfu": work / jx / peak, "torch_mfu": work / tx / peak,
            "peak_gflops": peak / 1e9, **extra}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="base", help=f"comma-separated of {sorted(SIZES)}")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 50], help="DDIM step counts")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="small size only, 2 repeats")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/"
                    "decoder[_small].json)")
    args = ap.parse_args(argv)
    if args.small:
        args.sizes, args.repeats = "small", 2
    torch.set_num_threads(os.cpu_count() or 1)
    load = machine_info().get("loadavg_1m_5m_15m")
    mm, mm_flops = matmul_probe()
    rows = [r for s in args.sizes.split(",") for r in bench_size(s, args, mm, mm_flops)]
    print(f"torch threads {torch.get_num_threads()}; load at start {load}; fp32; best of "
          f"{args.repeats}; guidance {args.guidance}")
    print(format_table(rows, ["size", "what", "batch", "jax_ms", "torch_ms", "jax_x",
                              "jax_img_s", "torch_img_s", "gflop", "jax_gflops", "jax_mfu",
                              "torch_mfu", "peak_gflops", "max_abs_err"]))
    result = {"args": vars(args), "machine": {**machine_info(), "loadavg_at_start": load},
              "configs": {s: DecoderConfig(**SIZES[s]).to_dict() for s in args.sizes.split(",")},
              "rows": rows}
    out = args.out or os.path.join(ROOT, "bench", "results",
                                   "decoder_small.json" if args.small else "decoder.json")
    name = os.path.splitext(os.path.basename(out))[0]
    print("wrote", write_json(name, result, os.path.dirname(os.path.abspath(out))))
    return result


if __name__ == "__main__":
    main()
