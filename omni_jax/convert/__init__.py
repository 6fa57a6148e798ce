"""Hugging Face checkpoint directories <-> (omni_jax config, params)."""
