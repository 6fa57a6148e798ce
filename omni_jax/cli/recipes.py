"""Command-line plumbing shared by the train, chat and evaluate CLIs: the --config / --workdir
/ --stage flags, recipe names in --config, and where the config comes from (--config, else the
run directory's resolved config)."""

from __future__ import annotations

import ml_collections
from absl import flags
from ml_collections import config_flags

from omni_jax.recipes.registry import known_recipes, load_recipe, resolve_recipe
from omni_jax.recipes.run import load_run_config

__all__ = ["config_or_run", "define_once", "error_message", "known_recipes", "load_recipe",
           "resolve_argv", "resolve_recipe"]

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "recipe file[:arg] or name[:arg] (e.g. ola:model=tiny); chat / evaluate "
    "default to the run directory's resolved config", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory (checkpoints, TensorBoard, resolved config), "
                    "shared by hosts; local or gs://")
flags.DEFINE_string("stage", None, "run / use only this stage")


def define_once(kind: str, name: str, default: object, help_text: str) -> None:
    """Define a flag unless another CLI module imported in this process already did (chat and
    evaluate share --max_new_tokens and --units_dir)."""
    if name not in flags.FLAGS:
        getattr(flags, f"DEFINE_{kind}")(name, default, help_text)


def config_or_run(config: ml_collections.ConfigDict | None, workdir: str
                  ) -> ml_collections.ConfigDict:
    """--config if given, else the resolved config the training run wrote into workdir."""
    return config if config is not None else load_run_config(workdir)


def error_message(e: Exception) -> str:
    """The user-facing line of a ValueError / flags error (config_flags wraps the errors that
    get_config raises in a traceback text: keep its last line)."""
    msg = str(e)
    if "Traceback" in msg:
        msg = [line for line in msg.splitlines() if line.strip()][-1]
        msg = msg.removeprefix("ValueError: ")
    return msg


def resolve_argv(argv: list[str]) -> list[str]:
    """Recipe names in --config become config file paths; unknown recipes -> ValueError."""
    out = list(argv)
    for i, a in enumerate(out):
        if a.startswith("--config="):
            path, arg = resolve_recipe(a.split("=", 1)[1])
            out[i] = f"--config={path}" + (f":{arg}" if arg else "")
        elif a == "--config" and i + 1 < len(out):
            path, arg = resolve_recipe(out[i + 1])
            out[i + 1] = path + (f":{arg}" if arg else "")
    return out
