"""Recipes as a library: lookup, stage planning, pretrained init, running, run directories.

  from omni_jax import recipes
  config = recipes.load_recipe("ola:model=tiny")
  plans = recipes.make_plan(config)            # validated stages, no compute
  recipes.run(config, "runs/ola")              # train every stage (resumes, skips finished)
  config = recipes.load_run_config("runs/ola")  # the resolved config the run wrote
  params = recipes.final_params("runs/ola", recipes.make_plan(config)[-1])
"""

from omni_jax.recipes.plan import (
    StagePlan,
    example_batch,
    final_params,
    format_plan,
    make_encoder,
    make_plan,
    model_of,
    stage_finished,
    stage_order,
    trainer_config,
)
from omni_jax.recipes.registry import known_recipes, load_recipe, resolve_recipe
from omni_jax.recipes.run import RUN_CONFIG, export_llm, load_run_config, run, write_run_config

__all__ = ["RUN_CONFIG", "StagePlan", "example_batch", "export_llm", "final_params",
           "format_plan", "known_recipes", "load_recipe", "load_run_config", "make_encoder",
           "make_plan", "model_of", "resolve_recipe", "run", "stage_finished", "stage_order",
           "trainer_config", "write_run_config"]
