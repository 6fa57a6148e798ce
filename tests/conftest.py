"""Test-wide settings: CPU only, float32 matmuls at full precision, cheap XLA compiles, quiet logs.

Tiny test models spend about a third of their CPU time in XLA's LLVM optimization passes;
level-0 backend optimization keeps the numerics (fp32 parity holds) and cuts the suite's CPU
time by about 30%. Tests that start subprocesses set their own XLA_FLAGS.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
_FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST).strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
