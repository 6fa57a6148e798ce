"""Evaluate a trained recipe: `python -m omni_jax.cli.evaluate --workdir DIR [--stage S|all]
[--data MANIFEST_OR_DIR ...] [--max_records N] [--out report.json] [--max_new_tokens N]
[--batch_size B] [--units_dir DIR] [--config RECIPE[:ARG]]`.

The config is the one the training run wrote into DIR (--config with --config.* overrides
replaces it, as for chat). Default stage: the last finished one; --stage all evaluates every
finished stage. --data (repeatable): JSONL manifests or directories of them (e.g. an
omni_digits export split dir); default: config.eval.data, else the validation / test split next
to config.data_root (omni_jax.eval.runner.default_data). --max_records: at most N records per
task. Writes the JSON report to --out (default DIR/eval/<stage>.json; with --stage all and
--out, one file {"stages": {name: report}}) and prints a table of the metrics (see
omni_jax.eval.tasks for which metric each task feeds and how). Records that cannot be
evaluated are listed under "skipped" in the JSON with the reason. Bad flags (no such workdir,
no finished stage, a missing --data path) print the error and exit with status 2.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from absl import flags

from omni_jax.cli import recipes

FLAGS = flags.FLAGS
DEFAULT_MAX_NEW_TOKENS = 16


_define = recipes.define_once  # main reads a flag chat may have defined only when given


_define("multi_string", "data", [], "JSONL manifest or directory of manifests (repeatable)")
_define("integer", "max_records", None, "evaluate at most this many records per task")
_define("string", "out", None, "report JSON path (default: WORKDIR/eval/<stage>.json)")
_define("integer", "max_new_tokens", DEFAULT_MAX_NEW_TOKENS,
        "answer tokens to generate (greedy) at least; more where a reference is longer "
        "(its length + eval.runner.REFERENCE_SLACK)")
_define("integer", "batch_size", 8, "prompts per generation batch")
_define("string", "units_dir", None, "vocoder directory for speech-out metrics (default: "
        "config.speech_units.dir, else a units/ dir next to the manifests)")


def _write(path: str, obj: object) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=True)
    os.replace(tmp, path)


def run_evaluate(config, workdir: str, *, stage: str | None = None,
                 data: Sequence[str] = (), max_records: int | None = None,
                 out: str | None = None, max_new_tokens: int = 16, batch_size: int = 8,
                 units_dir: str | None = None) -> dict[str, dict]:
    """Evaluate the chosen stage(s), write the report(s), print the tables -> {stage: report}.
    Flags are checked before any model loads."""
    from omni_jax.eval import runner
    from omni_jax.eval.tasks import manifest_paths

    if not os.path.isdir(workdir):
        raise ValueError(f"--workdir {workdir!r}: no such directory")
    if max_records is not None and max_records <= 0:
        raise ValueError(f"--max_records must be positive, got {max_records}")
    paths = manifest_paths(list(data) if data else runner.default_data(config))
    stages = runner.resolve_stages(config, workdir, stage)
    reports = {}
    for plan, _ in stages:
        rep = runner.evaluate_stage(config, workdir, plan.name, paths, max_records,
                                    max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    units_dir=units_dir)
        reports[plan.name] = rep
        print(runner.format_report(rep))
        if out is None:
            _write(os.path.join(workdir, "eval", f"{plan.name}.json"), rep)
    if out is not None:
        _write(out, reports[stages[0][0].name] if len(stages) == 1 else {"stages": reports})
    where = out or os.path.join(workdir, "eval")
    print(f"wrote the report(s) to {where}", file=sys.stderr)
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    try:
        argv = recipes.resolve_argv(argv)  # recipe names -> config files
        sys.argv = argv  # config_flags finds the --config.* overrides in sys.argv
        FLAGS(argv)
        if not FLAGS.workdir:
            raise ValueError("--workdir is required (the run directory of the train CLI)")
        if not os.path.isdir(FLAGS.workdir):
            raise ValueError(f"--workdir {FLAGS.workdir!r}: no such directory")
        config = recipes.config_or_run(FLAGS.config, FLAGS.workdir)
        run_evaluate(config, FLAGS.workdir, stage=FLAGS.stage, data=FLAGS.data,
                     max_records=FLAGS.max_records, out=FLAGS.out,
                     max_new_tokens=FLAGS.max_new_tokens if FLAGS["max_new_tokens"].present
                     else DEFAULT_MAX_NEW_TOKENS, batch_size=FLAGS.batch_size,
                     units_dir=FLAGS.units_dir)
    except AttributeError as e:  # an override of a field the config does not have
        print(f"error: bad --config override: no field {e}", file=sys.stderr)
        return 2
    except (ValueError, flags.Error) as e:
        print(f"error: {recipes.error_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
