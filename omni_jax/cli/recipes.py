"""Recipe lookup and command-line plumbing shared by the train and chat CLIs."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import ml_collections

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE_DIR = REPO_ROOT / "configs" / "recipes"


def known_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.py") if not p.stem.startswith("_"))


def resolve_recipe(spec: str) -> tuple[str, str | None]:
    """'ola:model=tiny' or 'configs/recipes/ola.py:model=tiny' -> (file path, arg)."""
    path, _, arg = spec.partition(":")
    if not path.endswith(".py") and os.sep not in path and "/" not in path:
        path = str(RECIPE_DIR / f"{path}.py")
    if not os.path.isfile(path):
        raise ValueError(f"unknown recipe {spec.partition(':')[0]!r}: no config file {path}; "
                         f"known recipes: {', '.join(known_recipes())}")
    return path, (arg or None)


def load_recipe(spec: str) -> ml_collections.ConfigDict:
    """Load a recipe config in-process (what --config does, without the flag machinery)."""
    path, arg = resolve_recipe(spec)
    s = importlib.util.spec_from_file_location(f"recipe_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(s)
    s.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


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
