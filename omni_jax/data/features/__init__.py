"""Media front ends on the host: Whisper log-mel (audio), SigLIP pixels + tiling (image),
frame sampling (video). NumPy/librosa/PIL/PyAV input-pipeline code, not jitted."""

from omni_jax.data.features.config import AudioConfig, ImageConfig, VideoConfig

__all__ = ["AudioConfig", "ImageConfig", "VideoConfig"]
