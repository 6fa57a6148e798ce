"""Stage-aware batches: a captions-only stage ships and encodes images only. Its train-step time
with the stage's own media budget vs the same stage forced to also ship and encode the unused
towers' media (the old per-modality budget `batch * seq_len // tokens_per_item`), timed
interleaved in one run on real fixture batches; plus, from shapes alone, what one batch of the
`ola:model=qwen7b` image_align stage carries either way.

    python bench/omni_step.py [--steps 5] [--recipe ola]

Writes bench/results/omni_step.json and prints a table. Not a test: never gates CI on timing.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from omni_jax import recipes  # noqa: E402
from omni_jax.model import tokens_per_item  # noqa: E402
from omni_jax.omni_config import MODALITIES  # noqa: E402

STAGES = {"ola": "image_align", "capybara": "phase1a"}


def forced_items(config, omni, stage: str, seq_len: int) -> dict[str, int]:
    """The budget every tower got before stage-aware planning."""
    batch = int(config.stages[stage].batch_size)
    return {m: batch * max(1, seq_len // tokens_per_item(omni, m)) for m in MODALITIES
            if getattr(omni, m) is not None}


def media_bytes(data: dict) -> dict[str, int]:
    out = {}
    for name, spec in data.get("media", {}).items():
        itemsize = np.dtype(spec.get("dtype", "float32")).itemsize
        out[name] = int(spec["max_items"]) * math.prod(spec["shape"]) * itemsize
    return out


def qwen7b_budgets(recipe: str) -> dict[str, dict[str, int]]:
    config = recipes.load_recipe(f"{recipe}:model=qwen7b")
    stage = STAGES[recipe]
    config.stage_order = (stage,)
    omni = recipes.model_of(config).config
    own = recipes.make_plan(config, count_data=False)[0].data
    seq = int(config.stages[stage].data.seq_len)
    config.stages[stage].media_items = forced_items(config, omni, stage, seq)
    forced = recipes.make_plan(config, count_data=False)[0].data
    return {"stage_aware": media_bytes(own), "all_towers": media_bytes(forced)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="ola", choices=sorted(STAGES))
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    from omni_jax.data.fixtures import make_fixtures, train_fixture_tokenizer
    from omni_jax.data.pipeline import make_dataset
    from omni_jax.train.trainer import Trainer

    tmp = tempfile.mkdtemp()
    manifests = make_fixtures(os.path.join(tmp, "fx"), num_images=16, num_audio=4,
                              num_videos=2, num_text=4, use_espeak=False)
    spm = train_fixture_tokenizer(manifests, 400, os.path.join(tmp, "spm"))
    stage = STAGES[args.recipe]
    results, steps = {}, {}
    for variant in ("stage_aware", "all_towers"):
        config = recipes.load_recipe(f"{args.recipe}:model=tiny")
        config.data_root, config.tokenizer.path = os.path.join(tmp, "fx"), spm
        config.stage_order = (stage,)
        config.train.progress_bar, config.train.tensorboard = False, False
        omni = recipes.model_of(config).config
        if variant == "all_towers":
            seq = int(config.stages[stage].data.seq_len)
            config.stages[stage].media_items = forced_items(config, omni, stage, seq)
        plan = recipes.make_plan(config)[0]
        trainer = Trainer(plan.trainer_config, plan.model)
        batch = next(iter(make_dataset(plan.data, recipes.make_encoder(config, omni))))
        state = {"s": trainer.init_state(batch)}
        sharded = trainer.shard(batch)

        def step(trainer=trainer, state=state, sharded=sharded):
            state["s"], metrics = trainer.train_step(state["s"], sharded)
            return metrics

        steps[variant] = step
        results[variant] = {"batch_keys": sorted(batch),
                            "media_mb": sum(media_bytes(plan.data).values()) / 2 ** 20}
    times = common.time_interleaved(steps, warmup=1, repeats=args.steps)
    rows = []
    for variant, t in times.items():
        results[variant]["step_ms"] = 1e3 * common.median(t)
        rows.append({"variant": variant, "step_ms": round(results[variant]["step_ms"], 1),
                     "media_MB": round(results[variant]["media_mb"], 2),
                     "keys": " ".join(k for k in results[variant]["batch_keys"]
                                      if k.split("_")[0] in MODALITIES)})
    ratio = results["all_towers"]["step_ms"] / results["stage_aware"]["step_ms"]
    print(f"{args.recipe} {stage} on the tiny omni model, batch from the fixture data:")
    print(common.format_table(rows))
    print(f"forcing the unused towers costs {ratio:.2f}x the stage-aware step")
    big = qwen7b_budgets(args.recipe)
    for variant, b in big.items():
        parts = ", ".join(f"{k} {v / 2 ** 20:.0f} MiB" for k, v in b.items())
        print(f"{args.recipe}:model=qwen7b {stage}, {variant}: media per batch "
              f"{sum(b.values()) / 2 ** 30:.2f} GiB ({parts})")
    out = {"recipe": args.recipe, "stage": stage, "tiny": results, "ratio": ratio,
           "qwen7b_media_bytes": big, "machine": common.machine_info()}
    print("wrote", common.write_json("omni_step", out))


if __name__ == "__main__":
    main()
