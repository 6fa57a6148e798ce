"""Installable: `pip install .` (not editable) of a copy of the source tree, run from another
directory, finds the shipped recipes and model configs (no repo checkout on sys.path)."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = {".git", ".venv", "runs", "build", "dist", "__pycache__", "omni_jax.egg-info", "tests",
        "bench", "notebooks"}


def test_pip_install_ships_recipes_and_configs(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=lambda d, names: [n for n in names if n in SKIP])
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                          "--no-build-isolation", "--target", str(site), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (site / "omni_jax" / "configs" / "recipes" / "ola.py").is_file()
    shutil.rmtree(src)  # nothing may come from the source tree any more
    env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=600)
    res = run("-c", "import omni_jax, omni_jax.recipes as r; print(omni_jax.__file__); "
                    "print(r.known_recipes()); c = r.load_recipe('capybara:model=qwen7b'); "
                    "print(len(r.make_plan(c, count_data=False)))")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[0].startswith(str(site))
    from omni_jax.recipes import known_recipes  # the source tree's recipes, all shipped

    assert lines[1] == str(known_recipes()) and "ola" in lines[1]
    assert int(lines[2]) == 5  # phase1a, phase1b, phase1c, phase2, phase3 at the 7B sizes
    res = run("-m", "omni_jax.cli.train", "--config", "ola:model=tiny", "--workdir",
              str(tmp_path / "w"), "--dry_run")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "recipe ola (model tiny): 5 stages" in res.stdout
