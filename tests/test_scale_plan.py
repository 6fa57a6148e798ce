"""The dry run's scale plan: per-device bytes of params, grads and optimizer state on a mesh of
any size, from abstract shapes (the qwen7b recipes plan on this CPU without allocating)."""

import jax
import numpy as np

from omni_jax.omni_config import OmniConfig
from omni_jax.recipes import load_recipe, make_plan, run
from omni_jax.recipes.scale import memory_plan
from omni_jax.train.omni_model import OmniLM
from omni_jax.train.stages import FREEZE


def test_one_device_counts_are_exact_and_fsdp_divides():
    c = load_recipe("capybara:model=tiny")
    model = OmniLM(OmniConfig.from_dict(c.model.to_dict()))
    plan = make_plan(c, model, count_data=False)[0]  # phase1a: the image adapter only
    one = memory_plan(plan.model, plan.trainer_config, 1)
    import flax.linen as nn

    from omni_jax.train.stages import StageConfig, label_tree
    params = nn.unbox(jax.eval_shape(lambda: model.init(
        jax.random.key(0), {"input_ids": jax.ShapeDtypeStruct((1, 8), np.int32)}))["params"])
    labels = jax.tree.leaves(label_tree(params, StageConfig.from_dict(
        plan.trainer_config.stage)))
    sizes = [int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(params)]
    trainable = sum(n for n, lab in zip(sizes, labels) if lab != FREEZE)
    assert one["params"] == sum(sizes) and one["grads"] == trainable
    assert 2 * trainable <= one["opt_state"] <= 2 * trainable + 64  # Adam mu, nu (+ counts)
    tc = plan.trainer_config
    tc.mesh = {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}
    assert memory_plan(plan.model, tc, 8)["params"] == one["params"]  # pure DP replicates
    tc.mesh = {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}
    fsdp = memory_plan(plan.model, tc, 8)
    assert one["params"] / 8 <= fsdp["params"] < one["params"] / 2
    assert fsdp["opt_state"] < one["opt_state"]


def test_dry_run_prints_the_scale_plan_of_a_7b_recipe():
    c = load_recipe("openomni:model=qwen7b")
    c.train.plan_devices = 64
    c.train.mesh.update(data=8, fsdp=8)
    lines = []
    run(c, "/nonexistent-workdir", dry_run=True, echo=lines.append)
    mem = [line for line in lines if "per device on data=8 x fsdp=8" in line]
    assert len(mem) == len(c.stage_order)
    instruct = next(line for line in mem if "image_instruct" in line)
    grads = float(instruct.split("grads ")[1].split(" GiB")[0])
    # all of the LLM + ViT train (7.9B fp32 params over fsdp=8: ~3.7 GiB of gradients)
    assert 3.0 < grads < 4.5


def test_dry_run_compiles_the_step_and_reports_xla_temporaries():
    """plan_compile: each non-speech stage's train step compiles from abstract inputs (shapes
    of the real batch: token keys + media budget) and XLA's temporaries are printed; a larger
    batch needs more temporary memory, so the number is the compiled program's."""
    from omni_jax.recipes.scale import compiled_memory

    c = load_recipe("capybara:model=tiny")
    c.train.plan_compile = True
    c.stage_order = ("phase1a", "phase1b")
    lines = []
    run(c, "/nonexistent-workdir", dry_run=True, echo=lines.append)
    compiled = [line for line in lines if "compiled step per device: temporaries" in line]
    assert len(compiled) == 2
    plan = make_plan(c, count_data=False)[1]
    small = compiled_memory(plan)
    plan.trainer_config.batch_size *= 4
    plan.data["batch_size"] *= 4
    for spec in plan.data["media"].values():
        spec["max_items"] *= 4
    big = compiled_memory(plan)
    assert 0 < small["temporaries"] < big["temporaries"]
    assert small["arguments"] < big["arguments"]
