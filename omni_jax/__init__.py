"""omni_jax: omni-modal language models in JAX/Flax."""

__version__ = "0.1.0"
