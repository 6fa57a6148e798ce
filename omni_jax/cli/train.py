"""Train a multi-stage recipe: `python -m omni_jax.cli.train --config RECIPE[:ARG] --workdir DIR`.

RECIPE is a config file (configs/recipes/ola.py) or a recipe name (ola); ARG goes to its
get_config (e.g. model=tiny). Override any field with --config.a.b=value. Stages run in
config.stage_order; each starts from the previous stage's final parameters, and a stage whose
final checkpoint exists is skipped on re-run (inside a stage, the trainer resumes from its
latest checkpoint). --stage NAME runs one stage (its predecessor must have finished);
--dry_run prints the stage plan (trainable parameter counts) without training. Bad input
(unknown recipe / stage, a trainable pattern matching nothing, ...) prints the error, exit 2.
Multi-host: --coordinator_address/--num_processes/--process_id or the OMNI_*/JAX_* env vars
(see omni_jax.parallel.mesh.maybe_initialize_distributed); the workdir must be shared.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from omni_jax.cli.recipes import (  # noqa: F401  (load_recipe etc. are re-exported)
    error_message,
    known_recipes,
    load_recipe,
    resolve_argv,
    resolve_recipe,
)
from omni_jax.omni_config import OmniConfig
from omni_jax.parallel.mesh import maybe_initialize_distributed
from omni_jax.recipes.data import audio_config, count_records, resolve_data, stage_steps
from omni_jax.recipes.init import load_init
from omni_jax.speech.targets import speech_targets
from omni_jax.train.omni_model import OmniLM, stage_model
from omni_jax.train.stages import FREEZE, StageConfig, label_tree

log = logging.getLogger("omni_jax.train")
STAGE_KEYS = ("trainable", "lr_groups", "losses")


# ---- the plan ---------------------------------------------------------------------------------
@dataclasses.dataclass
class StagePlan:
    """One stage resolved against the model: trainer config, counts, data sources."""

    name: str
    trainer_config: ml_collections.ConfigDict
    data: dict[str, Any]
    steps: int | None
    trainable_params: int
    total_params: int
    trainable_groups: list[str]
    model: Any = None  # the stage's TrainModel (a DPO stage adds a reference generator)


def _stage_order(config: ml_collections.ConfigDict) -> list[str]:
    """config.stage_order: known, distinct stage names (a subset runs only those, in order)."""
    order = list(config.stage_order)
    unknown = [s for s in order if s not in config.stages]
    if not order or unknown or len(set(order)) != len(order):
        raise ValueError(f"recipe {config.get('recipe')!r}: stage_order {order} must name "
                         f"distinct stages among {list(config.stages)}"
                         + (f"; unknown: {unknown}" if unknown else ""))
    return order


def trainer_config(config: ml_collections.ConfigDict, name: str, steps: int
                   ) -> ml_collections.ConfigDict:
    """The trainer's ConfigDict for one stage: config.train + the stage's batch/steps/optim."""
    from omni_jax.train.trainer import default_config

    s = config.stages[name]
    c = default_config()
    for key, value in config.train.items():
        if key not in ("fused_head_chunk", "plan_devices"):
            c[key] = value
    c.batch_size, c.steps = int(s.batch_size), int(steps)
    optim = s.optim.to_dict()
    if not optim.get("warmup_steps"):
        optim["warmup_steps"] = int(round(float(s.warmup_ratio) * steps))
    c.optim = ml_collections.ConfigDict(optim)
    c.stage = ml_collections.ConfigDict({"name": name, **{k: s[k] for k in STAGE_KEYS}})
    return c


def make_plan(config: ml_collections.ConfigDict, model: OmniLM, *, count_data: bool = True
              ) -> list[StagePlan]:
    """Validate every stage against the model's parameter tree (abstract init, no compute)."""
    from omni_jax.train.losses import make_objective

    for name in config.get("loss_modules", ()):  # registers their losses
        importlib.import_module(name)
    import flax.linen as nn

    order = _stage_order(config)
    batch = {"input_ids": jax.ShapeDtypeStruct((1, 8), np.int32)}
    trees: dict[bool, Any] = {}
    plans = []
    for name in order:
        s = config.stages[name]
        m = stage_model(model.config, s.losses, model.fused_head_chunk)
        if m.dpo_reference not in trees:
            trees[m.dpo_reference] = nn.unbox(jax.eval_shape(
                lambda m=m: m.init(jax.random.key(0), batch))["params"])
        params = trees[m.dpo_reference]
        sizes = jax.tree.leaves(jax.tree.map(lambda x: int(np.prod(x.shape)), params))
        unknown = sorted(set(s) - {"description", "data", "optim", "warmup_ratio", "steps",
                                   "epochs", "batch_size", "media_items", *STAGE_KEYS})
        if unknown:
            raise ValueError(f"stage {name!r}: unknown keys {unknown}")
        stage = StageConfig.from_dict({"name": name, **{k: s[k] for k in STAGE_KEYS}})
        labels = jax.tree.leaves(label_tree(params, stage))  # ValueError: pattern matches none
        make_objective(stage.losses)  # ValueError: unknown loss
        data = resolve_data(config, model.config, s)
        have = all(os.path.exists(p) for src in data["sources"].values()
                   for p in ([src["path"]] if isinstance(src["path"], str) else src["path"]))
        steps = stage_steps(name, s, data, count_records if count_data and have else None)
        tc = trainer_config(config, name, steps or 1)
        paths = [p for p, lab in zip(jax.tree.leaves(_paths(params)), labels) if lab != FREEZE]
        groups = sorted({p.split("/")[0] for p in paths})
        trainable = sum(n for n, lab in zip(sizes, labels) if lab != FREEZE)
        plans.append(StagePlan(name, tc, data, steps, trainable, sum(sizes), groups, m))
    return plans


def _paths(params: Any) -> Any:
    from omni_jax.train.stages import param_paths

    return param_paths(params)


def format_plan(config: ml_collections.ConfigDict, plans: Sequence[StagePlan]) -> str:
    lines = [f"recipe {config.recipe} (model {config.model_name}): {len(plans)} stages, "
             f"{plans[0].total_params:,} parameters"]
    for i, p in enumerate(plans):
        s = config.stages[p.name]
        steps = p.steps if p.steps is not None else f"{s.epochs} epoch(s)"
        mix = ", ".join(f"{k}:{v['weight']:g}" for k, v in p.data["sources"].items())
        lines.append(f"  {i + 1}. {p.name:<15} steps={steps} batch={s.batch_size} "
                     f"lr={s.optim.lr:g} trainable={p.trainable_params:,} "
                     f"({100 * p.trainable_params / p.total_params:.1f}%) "
                     f"[{', '.join(p.trainable_groups)}] losses={s.losses.to_dict()} data={mix}")
        if s.get("description"):
            lines.append(f"     {s.description}")
        media = p.data.get("media", {})
        lines.append("     media per batch: " + (", ".join(
            f"{k} {v['max_items']} x {tuple(v['shape'])}" for k, v in media.items())
            or "none (text only: no tower runs)"))
    return "\n".join(lines)


# ---- data ---------------------------------------------------------------------------------
class TextOnlyEncoder:
    """Record -> template tokens with media parts dropped (text-only runs of any recipe)."""

    def __init__(self, template: Any) -> None:
        self.template = template

    def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        messages = []
        for m in record["messages"]:
            content = m["content"]
            if not isinstance(content, str):
                content = [p for p in content if p.get("type") == "text"]
            messages.append({**m, "content": content})
        ex = self.template.encode(messages)
        return {"input_ids": ex.input_ids, "loss_mask": ex.loss_mask}


def make_encoder(config: ml_collections.ConfigDict, omni: OmniConfig) -> Any:
    """record -> example: OmniEncoder (template + media features), or text-only."""
    from omni_jax.data.omni import OmniEncoder
    from omni_jax.data.template import ChatTemplate
    from omni_jax.data.tokenizer import load_tokenizer

    if not config.tokenizer.path:
        raise ValueError("no tokenizer: set --config.tokenizer.path (a SentencePiece .model or, "
                         "with --config.tokenizer.kind=hf, a tokenizer.json)")
    tok = load_tokenizer(config.tokenizer.to_dict())
    if tok.vocab_size > omni.llm.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids but the LLM vocab_size is "
                         f"{omni.llm.vocab_size}")
    if config.text_only:
        return TextOnlyEncoder(ChatTemplate(tok))
    return OmniEncoder(omni, ChatTemplate(tok), audio=audio_config(config),
                       speech=speech_targets(config, omni, ChatTemplate(tok)))


# ---- running -------------------------------------------------------------------------------
def _checkpointer(workdir: str, name: str):
    from omni_jax.train.checkpoint import Checkpointer

    return Checkpointer(os.path.join(workdir, name, "checkpoints"), keep=1)


def stage_finished(workdir: str, plan: StagePlan) -> bool:
    """True if the stage's final checkpoint (step == its steps) exists."""
    if not os.path.isdir(os.path.join(workdir, plan.name, "checkpoints")):
        return False
    ckpt = _checkpointer(workdir, plan.name)
    try:
        return (ckpt.latest_step() or 0) >= plan.trainer_config.steps
    finally:
        ckpt.close()


def _example(plan: StagePlan) -> dict[str, np.ndarray]:
    from omni_jax.data.pipeline import DataConfig

    seq = DataConfig.from_dict(plan.data).max_len
    return {"input_ids": np.zeros((plan.trainer_config.batch_size, seq), np.int32)}


def final_params(workdir: str, plan: StagePlan, model: OmniLM) -> Any:
    """The final parameters of a finished stage, restored from its last checkpoint."""
    from omni_jax.train.trainer import Trainer

    ckpt = _checkpointer(workdir, plan.name)
    try:
        state = Trainer(plan.trainer_config, plan.model or model).restore_or_init(
            _example(plan), ckpt)
    finally:
        ckpt.close()
    return state["params"]


def run(config: ml_collections.ConfigDict, workdir: str, *, stage: str | None = None,
        dry_run: bool = False, echo: Callable[[str], None] = print) -> dict[str, str]:
    """Run (or with dry_run, plan) the recipe; -> {stage: "trained" | "skipped" | ...}."""
    from omni_jax.data.pipeline import make_dataset
    from omni_jax.train.trainer import Trainer

    omni = OmniConfig.from_dict(config.model.to_dict())
    model = OmniLM(omni, config.train.get("fused_head_chunk"))
    order = _stage_order(config)
    if stage is not None and stage not in order:
        raise ValueError(f"unknown stage {stage!r}; recipe {config.recipe!r} has stages {order}")
    plans = make_plan(config, model, count_data=not dry_run)
    echo(format_plan(config, plans))
    if dry_run:
        from omni_jax.recipes.scale import format_memory, memory_plan

        devices = int(config.train.get("plan_devices") or 0) or jax.device_count()
        for p in plans:
            echo(f"  {p.name}: " + format_memory(memory_plan(p.model, p.trainer_config, devices)))
        return {p.name: "planned" for p in plans}
    encoder = make_encoder(config, omni)
    first = order.index(stage) if stage is not None else 0
    last = first + 1 if stage is not None else len(order)
    if first > 0 and not stage_finished(workdir, plans[first - 1]):
        raise ValueError(f"stage {stage!r} starts from the final parameters of stage "
                         f"{order[first - 1]!r}, which has not finished in {workdir}; run it "
                         f"first (or run without --stage)")
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
        echo(f"stage {plan.name}: {plan.trainer_config.steps} steps"
             + (f", from stage {plans[i - 1].name}'s final parameters" if i > 0 else ""))
        trainer = Trainer(plan.trainer_config, plan.model)
        it = iter(make_dataset(plan.data, encoder))
        parts = None
        if i == 0 and config.get("init"):  # stage 1 starts from the pretrained parts
            parts = functools.partial(load_init, config.init.to_dict(), omni)
        state = trainer.run(it, _example(plan), os.path.join(workdir, plan.name), params=params,
                            parts=parts)
        step = int(jax.device_get(state["step"]))
        losses = [(k, m["train/loss/total"]) for k, m in getattr(trainer, "history", [])
                  if "train/loss/total" in m]
        if losses:
            echo(f"stage {plan.name}: loss {losses[0][1]:.4f} (step {losses[0][0]}) -> "
                 f"{losses[-1][1]:.4f} (step {losses[-1][0]})")
        if step < plan.trainer_config.steps:
            echo(f"stage {plan.name}: stopped at step {step} (signal); re-run to resume")
            status[plan.name] = "interrupted"
            return status
        status[plan.name], params = "trained", state["params"]
    return status


def export_llm(config: ml_collections.ConfigDict, workdir: str, out_dir: str, *,
               stage: str | None = None) -> None:
    """The LLM of a finished stage (default: the last) -> a transformers Qwen2 directory."""
    from omni_jax.convert.qwen2 import export_qwen2

    model = OmniLM(OmniConfig.from_dict(config.model.to_dict()))
    plans = {p.name: p for p in make_plan(config, model, count_data=False)}
    plan = plans[stage or _stage_order(config)[-1]]
    if not stage_finished(workdir, plan):
        raise ValueError(f"--export_hf: stage {plan.name!r} has not finished in {workdir}")
    params = jax.device_get(final_params(workdir, plan, model))
    if jax.process_index() == 0:
        export_qwen2(model.config.llm, {"params": params["llm"]}, out_dir)
        print(f"exported the LLM of stage {plan.name} -> {out_dir}")


# ---- command line -----------------------------------------------------------------------------
_CONFIG = config_flags.DEFINE_config_file("config", None, "recipe file[:arg] or name[:arg]",
                                          lock_config=True)
flags.DEFINE_string("workdir", None, "output directory (checkpoints, TensorBoard), shared by hosts")
flags.DEFINE_string("stage", None, "run only this stage")
flags.DEFINE_bool("dry_run", False, "print the stage plan and exit")
flags.DEFINE_string("export_hf", None, "after training: write the last stage's LLM as a Hugging "
                    "Face Qwen2ForCausalLM directory here")
flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
FLAGS = flags.FLAGS


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        argv = resolve_argv(argv)
        sys.argv = argv  # config_flags finds the --config.* overrides to define in sys.argv
        FLAGS(argv)
        if FLAGS.config is None or not FLAGS.workdir:
            raise ValueError("--config and --workdir are required")
        maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                     FLAGS.process_id)
        status = run(FLAGS.config, FLAGS.workdir, stage=FLAGS.stage, dry_run=FLAGS.dry_run)
        if FLAGS.export_hf and not FLAGS.dry_run:
            export_llm(FLAGS.config, FLAGS.workdir, FLAGS.export_hf, stage=FLAGS.stage)
    except (ValueError, flags.Error) as e:
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    print("stages: " + ", ".join(f"{k}={v}" for k, v in status.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
