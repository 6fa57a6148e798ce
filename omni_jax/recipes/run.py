"""Running a recipe: its stages in order, each from the previous stage's final parameters (stage
1 from config.init's pretrained parts), finished stages skipped on re-run; the run directory
keeps the resolved config so chat / export / evaluate need only `--workdir`.

  from omni_jax import recipes
  config = recipes.load_recipe("ola:model=tiny")
  recipes.run(config, "runs/ola")              # or dry_run=True: the plan + memory per device
  config = recipes.load_run_config("runs/ola")  # later, anywhere
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from omni_jax.recipes.init import load_init
from omni_jax.recipes.plan import (
    apply_init_from,
    example_batch,
    final_params,
    format_plan,
    make_encoder,
    make_plan,
    model_of,
    stage_finished,
    stage_order,
)
from omni_jax.utils import fs

RUN_CONFIG = "omni_jax_run.json"  # the resolved recipe config of a run directory
PATH_KEYS = (("data_root",), ("tokenizer", "path"), ("speech_units", "dir"))


def _absolute(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """config as a dict with its local paths made absolute (a run dir is read from anywhere)."""
    d = json.loads(config.to_json_best_effort())
    for keys in PATH_KEYS:
        node = d
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str) and node[keys[-1]]:
            node[keys[-1]] = fs.abspath(node[keys[-1]])
    for part, p in (d.get("init") or {}).items():
        if isinstance(p, str) and p:
            d["init"][part] = fs.abspath(p)
    return d


def write_run_config(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Write the resolved config into the run directory (process 0); -> its path."""
    path = fs.join(workdir, RUN_CONFIG)
    if jax.process_index() == 0:
        fs.makedirs(workdir)
        tmp = path + ".tmp"
        fs.write_text(tmp, json.dumps(_absolute(config), indent=2, sort_keys=True))
        fs.path(tmp).replace(path)
    return path


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote into its directory; ValueError if there is none."""
    path = fs.join(workdir, RUN_CONFIG)
    if not fs.isfile(path):
        raise ValueError(f"{workdir!r} is not an omni_jax run directory: no {RUN_CONFIG} (written "
                         "by python -m omni_jax.cli.train); pass --config instead")
    try:
        d = json.loads(fs.read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return ml_collections.ConfigDict(d)


def run(config: ml_collections.ConfigDict, workdir: str, *, stage: str | None = None,
        dry_run: bool = False, echo: Callable[[str], None] = print) -> dict[str, str]:
    """Run (or with dry_run, plan) the recipe; -> {stage: "trained" | "skipped" | ...}."""
    from omni_jax.data.pipeline import make_dataset
    from omni_jax.train.trainer import Trainer

    model = model_of(config)
    omni = model.config
    order = stage_order(config)
    if stage is not None and stage not in order:
        raise ValueError(f"unknown stage {stage!r}; recipe {config.recipe!r} has stages {order}")
    plans = make_plan(config, model, count_data=not dry_run)
    echo(format_plan(config, plans))
    if dry_run:
        from omni_jax.recipes.scale import format_memory, memory_plan

        devices = int(config.train.get("plan_devices") or 0) or jax.device_count()
        for p in plans:
            echo(f"  {p.name}: " + format_memory(memory_plan(p.model, p.trainer_config, devices)))
            if config.train.get("plan_compile"):  # XLA's own numbers: compiles every stage
                from omni_jax.recipes.scale import compiled_memory, format_compiled

                try:
                    echo(f"  {p.name}: " + format_compiled(compiled_memory(p)))
                except ValueError as e:
                    echo(f"  {p.name}: compiled step not planned: {e}")
        return {p.name: "planned" for p in plans}
    encoder = make_encoder(config, omni)
    first = order.index(stage) if stage is not None else 0
    last = first + 1 if stage is not None else len(order)
    if first > 0 and not stage_finished(workdir, plans[first - 1]):
        raise ValueError(f"stage {stage!r} starts from the final parameters of stage "
                         f"{order[first - 1]!r}, which has not finished in {workdir}; run it "
                         f"first (or run without --stage)")
    write_run_config(config, workdir)
    status, params = {}, None
    for i in range(first, last):
        plan = plans[i]
        if stage_finished(workdir, plan):
            echo(f"stage {plan.name}: final checkpoint exists, skipped")
            status[plan.name], params = "skipped", None
            continue
        if params is None and i > 0:
            params = final_params(workdir, plans[i - 1], model)
        if params is not None:
            params = plan.model.prepare_params(params)
            params = apply_init_from(params, dict(config.stages[plan.name].get("init_from")
                                                  or {}))
        echo(f"stage {plan.name}: {plan.trainer_config.steps} steps"
             + (f", from stage {plans[i - 1].name}'s final parameters" if i > 0 else ""))
        trainer = Trainer(plan.trainer_config, plan.model)
        it = iter(make_dataset(plan.data, encoder))
        parts = None
        if i == 0 and config.get("init"):  # stage 1 starts from the pretrained parts
            parts = functools.partial(load_init, config.init.to_dict(), omni)
        state = trainer.run(it, example_batch(plan), fs.join(workdir, plan.name), params=params,
                            parts=parts, calibrate=calibrator(plan, encoder, trainer))
        step = int(jax.device_get(state["step"]))
        losses = [(k, m["train/loss/total"]) for k, m in getattr(trainer, "history", [])
                  if "train/loss/total" in m]
        if losses:
            echo(f"stage {plan.name}: loss {losses[0][1]:.4f} (step {losses[0][0]}) -> "
                 f"{losses[-1][1]:.4f} (step {losses[-1][0]})")
        data = it.metrics() if hasattr(it, "metrics") else {}
        if data.get("data/dropped_too_long"):  # silently lost records would bias the mixture
            n, kept = int(data["data/dropped_too_long"]), int(data.get("data/examples", 0))
            echo(f"stage {plan.name}: WARNING {n} of {n + kept} examples dropped as longer than "
                 f"seq_len={plan.data.get('seq_len')} tokens (raise data.seq_len)")
        if step < plan.trainer_config.steps:
            echo(f"stage {plan.name}: stopped at step {step} (signal); re-run to resume")
            status[plan.name] = "interrupted"
            return status
        status[plan.name], params = "trained", state["params"]
        ev = config.get("eval") or {}
        if ev.get("after_each_stage"):
            evaluate_after(config, workdir, plan.name, echo)
    return status


def calibrator(plan: Any, encoder: Any, trainer: Any) -> Callable[[Any], Any] | None:
    """For a model with data-calibrated statistics (XVilaLM's head input): params -> params
    calibrated on the first batches of a fresh copy of the stage's stream (the training
    stream's position is untouched); None for other models."""
    from omni_jax.data.pipeline import make_dataset

    model = plan.model
    if not hasattr(model, "calibrate") or "diffusion" not in dict(
            plan.trainer_config.stage.losses):
        return None  # only a stage training the image decoder has generation rows

    def calibrate(params: Any) -> Any:
        if not model.needs_calibration(params):
            return params
        it = iter(make_dataset(plan.data, encoder))
        batches = list(itertools.islice(it, model.head.calibration_batches))  # a short stream
        return model.calibrate(params, batches, shard=trainer.shard)

    return calibrate


def evaluate_after(config: ml_collections.ConfigDict, workdir: str, stage: str,
                   echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Held-out evaluation of a finished stage (config.eval) -> report, also written to
    <workdir>/eval/<stage>.json (process 0) and echoed as a table."""
    from omni_jax.eval.runner import evaluate_stage, format_report

    ev = config.eval
    report = evaluate_stage(config, workdir, stage, [ev.data] if ev.get("data") else None,
                            int(ev.get("max_records") or 0) or None,
                            max_new_tokens=int(ev.get("max_new_tokens") or 16))
    if jax.process_index() == 0:
        path = fs.join(workdir, "eval", f"{stage}.json")
        fs.makedirs(fs.dirname(path))
        fs.write_text(path, json.dumps(report, indent=1, default=str))
    echo(format_report(report))
    return report


def export_llm(config: ml_collections.ConfigDict, workdir: str, out_dir: str, *,
               stage: str | None = None) -> None:
    """The LLM of a finished stage (default: the last) -> a transformers Qwen2 directory."""
    from omni_jax.convert.qwen2 import export_qwen2

    model = model_of(config)
    plans = {p.name: p for p in make_plan(config, model, count_data=False)}
    name = stage or stage_order(config)[-1]
    if name not in plans:
        raise ValueError(f"unknown stage {name!r}; recipe {config.recipe!r} has stages "
                         f"{list(plans)}")
    plan = plans[name]
    if not stage_finished(workdir, plan):
        raise ValueError(f"export: stage {plan.name!r} has not finished in {workdir}")
    params = jax.device_get(final_params(workdir, plan, model))
    if jax.process_index() == 0:
        with fs.local_dir_for_write(out_dir) as local:
            export_qwen2(model.config.llm, {"params": params["llm"]}, local)
        print(f"exported the LLM of stage {plan.name} -> {out_dir}")

