"""omni_jax: omni-modal LLMs in JAX/Flax (text, image, video, audio in; text and speech out)."""

from setuptools import find_packages, setup

# Bounds are the versions this project is tested with (see README); the upper bounds guard
# against API breaks we have not checked (jax 0.11, flax 0.13, transformers 6, ...).
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "tensorflow-datasets>=4.9.10,<5",
    "importlib_resources>=6",
    "einops>=0.8,<0.9",
    "sentencepiece>=0.2,<0.3",
    "librosa>=0.11,<0.12",
    "soundfile>=0.12",
    "ml_collections>=1.1,<2",
    "safetensors>=0.4",
    "numpy>=2.0,<3",
    "tensorboardX>=2.6",
    "tqdm>=4.60",
    "scipy>=1.11",  # sparse mel projection in data.features.audio
    "pillow>=10",  # image decoding / resizing in data.features.image
    "av>=12",  # PyAV: video decoding (wheels bundle ffmpeg; no system ffmpeg needed)
    "absl-py>=2",  # flags for the train CLI (ml_collections config_flags)
    "etils[epath]>=1.7",  # omni_jax.utils.fs: one path layer for local and gs:// paths
    "tokenizers>=0.22",  # tokenizer kind "hf" (a Hugging Face tokenizer.json)
    "threadpoolctl>=3",  # single-threaded BLAS while vocoding (speech.vocode_pool)
]

# Accelerators the launch scripts target; the same jax bounds as above.
EXTRAS = {
    "tpu": ["jax[tpu]>=0.10.2,<0.11"],
    "cuda": ["jax[cuda12]>=0.10.2,<0.11"],
    "gcs": ["gcsfs>=2024.2"],  # gs:// data, tokenizer, init and export paths via etils.epath
    "torch": ["torch>=2.3"],  # converters of torch checkpoint files (weights_only loads)
}

TEST_REQUIRES = [
    "pytest>=8",
    "pytest-xdist>=3.5",
    "torch==2.13.0",  # the CPU wheel on this project's machines; used only as the parity reference
    "transformers>=5.23,<6",
    "scikit-learn>=1.5",
    "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29",  # notebooks run in the suite
    "matplotlib>=3.8",  # the notebooks' figures
    "ruff>=0.6",
]

setup(
    name="omni_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=find_packages(include=["omni_jax", "omni_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES, **EXTRAS},
)
