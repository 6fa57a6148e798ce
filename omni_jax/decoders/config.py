"""DecoderConfig: the diffusion image decoder's hyper-parameters (DiT + noise schedule + DDIM).

X-VILA drives modality decoders from the LLM's outputs; this is the image one: a DiT with
adaLN-Zero time modulation and cross-attention to a conditioning sequence [batch, cond_len,
cond_dim] (LLM output rows, highway features), trained with classifier-free-guidance dropout
to a learned null sequence and sampled with DDIM.
"""

from __future__ import annotations

import dataclasses

from omni_jax.config_base import StrictConfig, check_choice, check_positive
from omni_jax.layers.common import parse_dtype

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTIONS = ("epsilon", "v")
POS_EMBEDS = ("sincos", "learned")


@dataclasses.dataclass(frozen=True)
class DecoderConfig(StrictConfig):
    """Images [batch, image_size, image_size, channels] in [-1, 1]; conditioning
    [batch, cond_len, cond_dim] with a [batch, cond_len] mask (True = a real row)."""

    image_size: int = 16
    channels: int = 1
    patch_size: int = 2
    hidden: int = 64  # DiT width
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0  # MLP inner width = round(mlp_ratio * hidden)
    cond_dim: int = 32  # width of the conditioning rows
    cond_len: int = 8  # rows of the conditioning sequence (and of the learned null sequence)
    pos_embed: str = "sincos"  # "sincos" (fixed 2-D) | "learned"
    pos_max_period: float = 10_000.0  # sin-cos positions: longest wavelength
    time_freq_dim: int = 256  # sinusoidal timestep features before the time MLP
    time_max_period: float = 10_000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"  # "linear" | "scaled_linear" | "cosine" (squaredcos_cap_v2)
    beta_start: float = 1e-4  # linear / scaled_linear only
    beta_end: float = 0.02
    cosine_max_beta: float = 0.999  # cosine only: betas are capped here
    prediction: str = "epsilon"  # network target: "epsilon" | "v"
    clip_sample: bool = True  # DDIM clips the predicted x0 to [-clip_range, clip_range]
    clip_range: float = 1.0
    cfg_dropout: float = 0.1  # training: P(conditioning -> the learned null sequence)
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        who = "DecoderConfig"
        check_positive(who, image_size=self.image_size, channels=self.channels,
                       patch_size=self.patch_size, hidden=self.hidden, layers=self.layers,
                       heads=self.heads, mlp_ratio=self.mlp_ratio, cond_dim=self.cond_dim,
                       cond_len=self.cond_len, time_freq_dim=self.time_freq_dim,
                       time_max_period=self.time_max_period,
                       pos_max_period=self.pos_max_period, norm_eps=self.norm_eps,
                       init_std=self.init_std, num_train_timesteps=self.num_train_timesteps,
                       beta_start=self.beta_start, beta_end=self.beta_end,
                       cosine_max_beta=self.cosine_max_beta, clip_range=self.clip_range)
        check_choice(who, "beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_choice(who, "prediction", self.prediction, PREDICTIONS)
        check_choice(who, "pos_embed", self.pos_embed, POS_EMBEDS)
        if self.image_size % self.patch_size:
            raise ValueError(f"{who}: image_size={self.image_size} is not divisible by "
                             f"patch_size={self.patch_size}")
        if self.hidden % self.heads:
            raise ValueError(f"{who}: hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.pos_embed == "sincos" and self.hidden % 4:
            raise ValueError(f"{who}: 2-D sin-cos positions need hidden % 4 == 0, got "
                             f"hidden={self.hidden}")
        if self.time_freq_dim % 2:
            raise ValueError(f"{who}.time_freq_dim must be even (cos | sin halves), got "
                             f"{self.time_freq_dim}")
        if not self.beta_start < self.beta_end < 1:
            raise ValueError(f"{who}: need 0 < beta_start < beta_end < 1, got beta_start="
                             f"{self.beta_start}, beta_end={self.beta_end}")
        if self.cosine_max_beta >= 1:
            raise ValueError(f"{who}.cosine_max_beta must be in (0, 1), got "
                             f"{self.cosine_max_beta}")
        if not 0 <= self.cfg_dropout < 1:
            raise ValueError(f"{who}.cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        if not isinstance(self.clip_sample, bool):
            raise ValueError(f"{who}.clip_sample must be a bool, got {self.clip_sample!r}")
        parse_dtype(self.dtype)
        parse_dtype(self.param_dtype)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def mlp_hidden(self) -> int:
        return round(self.mlp_ratio * self.hidden)

    @property
    def grid(self) -> int:
        """Side of the patch grid."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def patch_dim(self) -> int:
        """Values per patch: patch_size^2 * channels."""
        return self.patch_size * self.patch_size * self.channels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)

    def flops_per_image(self) -> float:
        """Forward FLOPs (2 x MACs) of one image's DiT pass: patch embed, time MLP, blocks,
        final layer; attention scores included, elementwise ops not."""
        n, d, m, c = self.num_patches, self.hidden, self.mlp_hidden, self.cond_len
        block = (n * (4 * d * d + 2 * d * m + 2 * d * d)  # self qkvo, mlp, cross q/o
                 + c * 2 * d * d  # cross k/v over the projected conditioning
                 + 2 * n * n * d + 2 * n * c * d  # scores and weighted sums
                 + 6 * d * d)  # adaLN modulation
        macs = (n * self.patch_dim * d + self.time_freq_dim * d + d * d
                + c * (self.cond_dim * d + d * d)  # conditioning projector
                + self.layers * block + 2 * d * d + n * d * self.patch_dim)
        return 2.0 * macs
