# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
export XLA_PYTHON_CLIENT_PREALLOCATE := false

.PHONY: env demo test lint bench

env:
	@bash scripts/setup_env.sh

demo: env
	$(PY) -m omni_jax.cli.demo --workdir runs/demo

test: env
	$(PY) -m pytest -n 2 -q tests

lint: env
	$(VENV)/bin/ruff check .

bench: env
	$(PY) bench/llm_forward.py
