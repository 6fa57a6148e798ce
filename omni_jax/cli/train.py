"""Train a multi-stage recipe: `python -m omni_jax.cli.train --config RECIPE[:ARG] --workdir DIR`.

RECIPE is a recipe name (ola, shipped in omni_jax/configs/recipes) or a config file path; ARG
goes to its get_config (e.g. model=tiny). Override any field with --config.a.b=value. Stages run
in config.stage_order; each starts from the previous stage's final parameters (stage 1 from
config.init's pretrained parts), and a stage whose final checkpoint exists is skipped on re-run
(inside a stage, the trainer resumes from its latest checkpoint). --stage NAME runs one stage
(its predecessor must have finished); --dry_run prints the stage plan (trainable parameter
counts, media budgets, per-device memory) without training. The run writes its resolved config
into DIR (omni_jax_run.json), which chat / evaluate / --export_hf read. Bad input (unknown
recipe / stage, a trainable pattern matching nothing, ...) prints the error, exit 2.
Multi-host: --coordinator_address/--num_processes/--process_id or the OMNI_*/JAX_* env vars
(see omni_jax.parallel.mesh.maybe_initialize_distributed); the workdir must be shared.
The planning and running live in omni_jax.recipes (this file is flags only).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from absl import flags

from omni_jax import recipes
from omni_jax.cli.recipes import error_message, resolve_argv
from omni_jax.parallel.mesh import maybe_initialize_distributed

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
        status = recipes.run(FLAGS.config, FLAGS.workdir, stage=FLAGS.stage,
                             dry_run=FLAGS.dry_run)
        if FLAGS.export_hf and not FLAGS.dry_run:
            recipes.export_llm(FLAGS.config, FLAGS.workdir, FLAGS.export_hf, stage=FLAGS.stage)
    except (ValueError, flags.Error) as e:
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    print("stages: " + ", ".join(f"{k}={v}" for k, v in status.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
