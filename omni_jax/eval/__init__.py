"""Evaluation of trained stages: metrics (eval.metrics), per-task evaluators (eval.tasks) and
the runner (eval.runner; CLI: python -m omni_jax.cli.evaluate).

  from omni_jax.eval import evaluate_stage
  report = evaluate_stage(config, "runs/oo", None, ["data/validation"])
"""

from omni_jax.eval.runner import Evaluator, evaluate_items, evaluate_stage, format_report

__all__ = ["Evaluator", "evaluate_items", "evaluate_stage", "format_report"]
