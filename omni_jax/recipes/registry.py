"""Recipe lookup: a name (`ola`, shipped in omni_jax/configs/recipes) or any config file path,
with an optional `:ARG` for its get_config (`ola:model=tiny`)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import ml_collections

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
RECIPE_DIR = CONFIG_DIR / "recipes"


def known_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.py") if not p.stem.startswith("_"))


def resolve_recipe(spec: str) -> tuple[str, str | None]:
    """'ola:model=tiny' or 'path/to/recipe.py:model=tiny' -> (file path, arg)."""
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
