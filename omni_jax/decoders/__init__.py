"""Output decoders driven by the LLM (X-VILA any-to-any): a DiT diffusion image decoder."""

from omni_jax.decoders.config import DecoderConfig
from omni_jax.decoders.diffusion import alphas_cumprod, ddim_sample, diffusion_loss, q_sample
from omni_jax.decoders.dit import DiT, decoder_apply_fn, init_decoder

__all__ = ["DecoderConfig", "DiT", "alphas_cumprod", "ddim_sample", "decoder_apply_fn",
           "diffusion_loss", "init_decoder", "q_sample"]
