"""The stage plan of a recipe: each stage resolved against the model (trainer config, trainable
parameters, data and media budgets), finished-stage detection and a stage's final parameters.

  plans = make_plan(config, OmniLM(OmniConfig.from_dict(config.model.to_dict())))
  print(format_plan(config, plans))
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from omni_jax.model import tokens_per_item
from omni_jax.omni_config import OmniConfig
from omni_jax.recipes.data import audio_config, count_records, resolve_data, stage_steps
from omni_jax.speech.targets import speech_targets
from omni_jax.train.omni_model import OmniLM, stage_model
from omni_jax.train.stages import FREEZE, StageConfig, label_tree, param_paths
from omni_jax.utils import fs

STAGE_KEYS = ("trainable", "lr_groups", "losses")
STAGE_FIELDS = {"description", "data", "optim", "warmup_ratio", "steps", "epochs",
                "batch_size", "media_items", "init_from", *STAGE_KEYS}
# config.train keys the trainer does not take
TRAIN_ONLY = ("fused_head_chunk", "plan_devices", "plan_compile")


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


def stage_order(config: ml_collections.ConfigDict) -> list[str]:
    """config.stage_order: known, distinct stage names (a subset runs only those, in order)."""
    order = list(config.stage_order)
    unknown = [s for s in order if s not in config.stages]
    if not order or unknown or len(set(order)) != len(order):
        raise ValueError(f"recipe {config.get('recipe')!r}: stage_order {order} must name "
                         f"distinct stages among {list(config.stages)}"
                         + (f"; unknown: {unknown}" if unknown else ""))
    return order


def model_of(config: ml_collections.ConfigDict) -> Any:
    """The recipe's train model (config.model + config.train.fused_head_chunk): an OmniLM, or
    with config.xvila_output (X-VILA's output side) an XVilaLM with that head."""
    omni = OmniConfig.from_dict(config.model.to_dict())
    chunk = config.train.get("fused_head_chunk")
    if not config.get("xvila_output"):
        return OmniLM(omni, chunk)
    from omni_jax.decoders.xvila import XVilaHeadConfig
    from omni_jax.train.xvila_model import XVilaLM

    head = config.xvila_output.to_dict()
    gen_id = xvila_gen_id(config, head.pop("gen_token_id", None))
    return XVilaLM(omni, XVilaHeadConfig.from_dict(head), gen_id, chunk)


def xvila_gen_id(config: ml_collections.ConfigDict, configured: int | None) -> int:
    """The generation token's id: the tokenizer's gen_image_token when config.tokenizer.path is
    set (it must agree with a configured xvila_output.gen_token_id), else the configured id,
    else 0: a plan-only placeholder (planning traces shapes; encoding, training and generating
    all load the tokenizer first, which then supplies the real id)."""
    if not config.tokenizer.get("path"):
        return 0 if configured is None else int(configured)
    from omni_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(config.tokenizer.to_dict())
    if "gen_image" not in tok.special_ids:
        raise ValueError(f"xvila_output needs a tokenizer with a generation token: set "
                         f"--config.tokenizer.gen_image_token (it is "
                         f"{config.tokenizer.get('gen_image_token')!r})")
    gen_id = int(tok.special_ids["gen_image"])
    if configured is not None and int(configured) != gen_id:
        raise ValueError(f"xvila_output.gen_token_id={configured} but the tokenizer's "
                         f"{config.tokenizer.gen_image_token!r} is id {gen_id}")
    return gen_id


def trainer_config(config: ml_collections.ConfigDict, name: str, steps: int
                   ) -> ml_collections.ConfigDict:
    """The trainer's ConfigDict for one stage: config.train + the stage's batch/steps/optim."""
    from omni_jax.train.trainer import default_config

    s = config.stages[name]
    c = default_config()
    for key, value in config.train.items():
        if key not in TRAIN_ONLY:
            c[key] = value
    c.batch_size, c.steps = int(s.batch_size), int(steps)
    optim = s.optim.to_dict()
    if not optim.get("warmup_steps"):
        optim["warmup_steps"] = int(round(float(s.warmup_ratio) * steps))
    c.optim = ml_collections.ConfigDict(optim)
    c.stage = ml_collections.ConfigDict({"name": name, **{k: s[k] for k in STAGE_KEYS}})
    return c


def make_plan(config: ml_collections.ConfigDict, model: OmniLM | None = None, *,
              count_data: bool = True) -> list[StagePlan]:
    """Validate every stage against the model's parameter tree (abstract init, no compute).
    count_data: count the manifests' records to turn `epochs` into steps (when they exist)."""
    import flax.linen as nn

    from omni_jax.train.audio_ctc import check_stage as check_audio_ctc
    from omni_jax.train.image_bow import check_stage as check_image_bow
    from omni_jax.train.losses import make_objective

    model = model_of(config) if model is None else model
    for name in config.get("loss_modules", ()):  # registers their losses
        importlib.import_module(name)
    batch = {"input_ids": jax.ShapeDtypeStruct((1, 8), np.int32)}
    trees: dict[bool, Any] = {}
    plans = []
    for name in stage_order(config):
        s = config.stages[name]
        m = model if config.get("xvila_output") else stage_model(model.config, s.losses,
                                                                 model.fused_head_chunk)
        if m.dpo_reference not in trees:
            trees[m.dpo_reference] = nn.unbox(jax.eval_shape(
                lambda m=m: m.init(jax.random.key(0), batch))["params"])
        params = trees[m.dpo_reference]
        sizes = jax.tree.leaves(jax.tree.map(lambda x: int(np.prod(x.shape)), params))
        unknown = sorted(set(s) - STAGE_FIELDS)
        if unknown:
            raise ValueError(f"stage {name!r}: unknown keys {unknown}; a stage takes "
                             f"{sorted(STAGE_FIELDS)}")
        check_init_from(name, dict(s.get("init_from") or {}), params, first=not plans)
        stage = StageConfig.from_dict({"name": name, **{k: s[k] for k in STAGE_KEYS}})
        labels = jax.tree.leaves(label_tree(params, stage))  # ValueError: pattern matches none
        make_objective(stage.losses)  # ValueError: unknown loss
        data = resolve_data(config, model.config, s)
        check_audio_ctc(name, s.losses, data, config.get("transcript_tasks"),
                        tokens_per_item(model.config, "audio") if model.config.audio else None,
                        text_only=bool(config.get("text_only")),
                        xvila=bool(config.get("xvila_output")))
        check_image_bow(name, s.losses, data, config.get("transcript_tasks"),
                        model.config.image is not None,
                        text_only=bool(config.get("text_only")),
                        xvila=bool(config.get("xvila_output")))
        have = all(fs.exists(p) for src in data["sources"].values()
                   for p in ([src["path"]] if isinstance(src["path"], str) else src["path"]))
        steps = stage_steps(name, s, data, count_records if count_data and have else None)
        tc = trainer_config(config, name, steps or 1)
        paths = [p for p, lab in zip(jax.tree.leaves(param_paths(params)), labels)
                 if lab != FREEZE]
        groups = sorted({p.split("/")[0] for p in paths})
        trainable = sum(n for n, lab in zip(sizes, labels) if lab != FREEZE)
        plans.append(StagePlan(name, tc, data, steps, trainable, sum(sizes), groups, m))
    return plans


def check_init_from(name: str, init_from: Mapping[str, str], params: Any, first: bool) -> None:
    """ValueError unless every {module: source} of a stage's init_from names two top-level
    parameter subtrees of one structure and shapes, on a stage that has a previous stage."""
    if init_from and first:
        raise ValueError(f"stage {name!r}: init_from {init_from} needs a previous stage whose "
                         f"final parameters it copies; this is the recipe's first stage")
    for dst, src in init_from.items():
        missing = [m for m in (dst, src) if m not in params]
        if missing or dst == src:
            raise ValueError(f"stage {name!r}: init_from {dst!r} <- {src!r} must name two "
                             f"different top-level parameter subtrees of the model "
                             f"{sorted(params)}" + (f"; missing: {missing}" if missing else ""))
        shapes = [jax.tree.map(lambda x: tuple(x.shape), params[m]) for m in (dst, src)]
        if shapes[0] != shapes[1]:
            raise ValueError(f"stage {name!r}: init_from {dst!r} <- {src!r}: the subtrees "
                             f"differ in structure or shapes ({shapes[0]} vs {shapes[1]}); "
                             "they must be the same module configuration")


def apply_init_from(params: Any, init_from: Mapping[str, str]) -> Any:
    """params with each init_from module replaced by a copy of its source's values."""
    if not init_from:
        return params
    out = dict(params)
    for dst, src in init_from.items():
        out[dst] = jax.tree.map(lambda x: x.copy(), params[src])  # no buffer shared (donation)
    return type(params)(out)  # dict or FrozenDict, as given


def format_plan(config: ml_collections.ConfigDict, plans: Sequence[StagePlan]) -> str:
    """The plan as text: one block per stage (steps, batch, lr, trainable share, data, media)."""
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


def load_template(config: ml_collections.ConfigDict, omni: OmniConfig) -> Any:
    """The recipe's tokenizer in its chat template; ValueError if unset or too big for the LLM."""
    from omni_jax.data.template import ChatTemplate
    from omni_jax.data.tokenizer import load_tokenizer

    if not config.tokenizer.path:
        raise ValueError("no tokenizer: set --config.tokenizer.path (a SentencePiece .model or, "
                         "with --config.tokenizer.kind=hf, a tokenizer.json)")
    tok = load_tokenizer(config.tokenizer.to_dict())
    if tok.vocab_size > omni.llm.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids but the LLM vocab_size is "
                         f"{omni.llm.vocab_size}")
    if config.get("xvila_output"):  # a gen_image part renders the head's K tokens
        from omni_jax.data.template import TemplateConfig

        return ChatTemplate(tok, TemplateConfig(
            gen_image_tokens=int(config.xvila_output.gen_tokens)))
    return ChatTemplate(tok)


def gen_targets(config: ml_collections.ConfigDict, template: Any) -> Any:
    """GenTargets (image-out targets of gen_image records) for an X-VILA output model."""
    if not config.get("xvila_output"):
        return None
    from omni_jax.data.gen_image import GenTargets

    head = config.xvila_output
    shape = (head.decoder.image_size, head.decoder.image_size, head.decoder.channels)
    gen_id = xvila_gen_id(config, head.get("gen_token_id"))
    return GenTargets(shape, gen_id, int(head.gen_tokens))


def make_encoder(config: ml_collections.ConfigDict, omni: OmniConfig) -> Any:
    """record -> example: OmniEncoder (template + media features), or text-only."""
    from omni_jax.data.omni import OmniEncoder

    template = load_template(config, omni)
    if config.text_only:
        return TextOnlyEncoder(template)
    return OmniEncoder(omni, template, audio=audio_config(config),
                       speech=speech_targets(config, omni, template),
                       gen=gen_targets(config, template),
                       transcript_tasks=config.get("transcript_tasks") or ())


# ---- checkpoints ------------------------------------------------------------------------------
def checkpointer(workdir: str, name: str) -> Any:
    from omni_jax.train.checkpoint import Checkpointer

    return Checkpointer(fs.join(workdir, name, "checkpoints"), keep=1)


def stage_finished(workdir: str, plan: StagePlan) -> bool:
    """True if the stage's final checkpoint (step == its steps) exists."""
    if not fs.isdir(fs.join(workdir, plan.name, "checkpoints")):
        return False
    ckpt = checkpointer(workdir, plan.name)
    try:
        return (ckpt.latest_step() or 0) >= plan.trainer_config.steps
    finally:
        ckpt.close()


def example_batch(plan: StagePlan) -> dict[str, np.ndarray]:
    """One batch's input_ids (shapes only matter) for the trainer's abstract init."""
    from omni_jax.data.pipeline import DataConfig

    seq = DataConfig.from_dict(plan.data).max_len
    return {"input_ids": np.zeros((plan.trainer_config.batch_size, seq), np.int32)}


def final_params(workdir: str, plan: StagePlan, model: OmniLM | None = None) -> Any:
    """The final parameters of a finished stage: restored alone (no optimizer state) from its
    last checkpoint, straight into the stage's parameter shardings on the configured mesh."""
    from omni_jax.train.trainer import Trainer

    trainer = Trainer(plan.trainer_config, plan.model or model)
    trainer._setup(example_batch(plan))
    ckpt = checkpointer(workdir, plan.name)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise ValueError(f"stage {plan.name!r} has no checkpoint in "
                             f"{fs.join(workdir, plan.name, 'checkpoints')}")
        return ckpt.restore_params(step, trainer.abstract_state["params"])
    finally:
        ckpt.close()
