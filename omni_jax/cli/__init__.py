"""Command-line entry points (python -m omni_jax.cli.<name>)."""
