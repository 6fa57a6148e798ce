"""SigLIP / CLIP ViT: patch conv + learned position grid (interpolated to any patch grid) +
pre-LN transformer blocks; returns the patch features of a chosen layer.

CLIP (OpenAI ViT-L/14-336, the OpenOmni / LLaVA tower) differs from SigLIP only by config:
`class_token` (a learned [CLS] prepended before the positions; its position row is kept apart
from the patch grid when that is resized), `pre_layernorm` (HF `pre_layrnorm` after the
embeddings), `patch_bias=False`, `hidden_act="quick_gelu"` and `use_post_layernorm=False` (HF's
CLIP post-LayerNorm only normalizes the pooled [CLS]). `feature` picks what is returned:
"patch" drops the [CLS] token (LLaVA's select_feature="patch"), "cls_patch" keeps it first.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_jax.config_base import StrictConfig, check_positive
from omni_jax.layers.attention import Attention
from omni_jax.layers.common import constrain, logical_init, parse_dtype
from omni_jax.layers.interpolate import METHODS, resize_2d
from omni_jax.layers.mlp import GeluMLP, activation
from omni_jax.layers.norms import LayerNorm

_ACT = ("act_batch", "act_len", "act_embed")
FEATURES = ("patch", "cls_patch")
QUICK_GELU = "quick_gelu"  # CLIP's x * sigmoid(1.702 x); not (yet) in layers.mlp


def vision_activation(name: str):
    """Activation by HF name: layers.mlp's set plus CLIP's quick_gelu; ValueError otherwise."""
    if name == QUICK_GELU:
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    try:
        return activation(name)
    except ValueError as e:
        raise ValueError(f"{e} (or {QUICK_GELU!r})") from None


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig(StrictConfig):
    """SigLIP (default) or CLIP vision tower hyper-parameters (names follow transformers'
    SiglipVisionConfig, plus which layer to return and how to resize the position grid)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_channels: int = 3
    # native (pre-training) resolution; the position table covers its (image_size // patch)^2
    # grid. It need not be a multiple of patch_size (so400m: 384 / 14): the conv drops the rest.
    image_size: int = 32
    patch_size: int = 8
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    # Index into HF's hidden_states tuple (0 = embeddings, i = output of layer i; negative counts
    # from the end: -1 = last layer, -2 = the one before, as OpenOmni/LLaVA use).
    select_layer: int = -1
    use_post_layernorm: bool = True  # HF SiglipVisionModel.last_hidden_state applies it
    pos_interp: str = "bicubic"  # HF interpolate_pos_encoding; Ola resizes bilinearly
    initializer_range: float = 0.02
    # CLIP: learned [CLS] token + its position row, LayerNorm after the embeddings, no conv bias
    class_token: bool = False
    pre_layernorm: bool = False
    patch_bias: bool = True
    feature: str = "patch"  # "patch" (no [CLS]) | "cls_patch" ([CLS] first); see module doc
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_positive("SiglipVisionConfig", hidden_size=self.hidden_size,
                       intermediate_size=self.intermediate_size, num_layers=self.num_layers,
                       num_heads=self.num_heads, num_channels=self.num_channels,
                       image_size=self.image_size, patch_size=self.patch_size,
                       layer_norm_eps=self.layer_norm_eps,
                       initializer_range=self.initializer_range)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"SiglipVisionConfig: hidden_size={self.hidden_size} is not divisible "
                             f"by num_heads={self.num_heads}")
        if self.image_size < self.patch_size:  # not nec. divisible: so400m is 384 / patch 14
            raise ValueError(f"SiglipVisionConfig: image_size={self.image_size} is smaller than "
                             f"patch_size={self.patch_size}")
        n = self.num_layers
        if not -(n + 1) <= self.select_layer <= n:
            raise ValueError(f"SiglipVisionConfig: select_layer={self.select_layer} out of range "
                             f"[{-(n + 1)}, {n}] for num_layers={n} (0 = embeddings, -1 = last)")
        if self.pos_interp not in METHODS:
            raise ValueError(f"SiglipVisionConfig: unknown pos_interp {self.pos_interp!r}; "
                             f"expected one of {METHODS}")
        if self.feature not in FEATURES:
            raise ValueError(f"SiglipVisionConfig: unknown feature {self.feature!r}; expected "
                             f"one of {FEATURES}")
        if self.feature == "cls_patch" and not self.class_token:
            raise ValueError("SiglipVisionConfig: feature='cls_patch' needs class_token=True")
        vision_activation(self.hidden_act)
        parse_dtype(self.dtype)
        parse_dtype(self.param_dtype)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def native_grid(self) -> int:
        """Side of the square patch grid the position table was trained on."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Rows of the learned position table: the native grid (+ 1 for the [CLS] token)."""
        return self.native_grid ** 2 + int(self.class_token)

    @property
    def layers_run(self) -> int:
        """How many blocks the forward pass runs to reach `select_layer`."""
        return self.select_layer % (self.num_layers + 1)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (rows, cols) of a height x width image; the encoder returns rows * cols
        tokens in row-major order. Each side must be a positive multiple of patch_size or equal
        image_size (whose remainder pixels the patch conv drops, as in pre-training)."""
        p, n = self.patch_size, self.image_size
        if not all(s > 0 and (s % p == 0 or s == n) for s in (height, width)):
            raise ValueError(f"image size {height}x{width} must be positive multiples of "
                             f"patch_size={p} (or the native image_size={n})")
        return height // p, width // p

    def num_patches(self, height: int, width: int) -> int:
        gh, gw = self.grid(height, width)
        return gh * gw

    def num_tokens(self, height: int, width: int) -> int:
        """Tokens the encoder returns: the patches, plus the [CLS] for feature='cls_patch'."""
        return self.num_patches(height, width) + int(self.feature == "cls_patch")


class VisionMLP(nn.Module):
    """fc2(act(fc1(x))) with biases, same tree as GeluMLP; also takes CLIP's quick_gelu."""

    hidden: int
    act: str
    init_std: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [batch, tokens, embed]
        init = nn.initializers.normal(self.init_std)
        h = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=logical_init(init, ("embed", "mlp")),
                     bias_init=logical_init(nn.initializers.zeros, ("mlp",)), name="fc1")(x)
        h = constrain(vision_activation(self.act)(h), ("act_batch", "act_len", "act_mlp"))
        return nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=logical_init(init, ("mlp", "embed")),
                        bias_init=logical_init(nn.initializers.zeros, ("embed",)), name="fc2")(h)


class SiglipBlock(nn.Module):
    """x + attn(ln1(x)); x + mlp(ln2(x)) with biased projections and no mask or rope."""

    config: SiglipVisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [batch, patches, embed]
        c = self.config
        dt, pdt = parse_dtype(c.dtype), parse_dtype(c.param_dtype)
        h = LayerNorm(c.layer_norm_eps, dtype=dt, param_dtype=pdt, name="attn_norm")(x)
        h, _ = Attention(c.num_heads, c.num_heads, c.head_dim, q_bias=True, k_bias=True,
                         v_bias=True, o_bias=True, init_std=c.initializer_range, dtype=dt,
                         param_dtype=pdt, name="attn")(h)
        x = constrain(x + h, _ACT)
        h = LayerNorm(c.layer_norm_eps, dtype=dt, param_dtype=pdt, name="mlp_norm")(x)
        mlp = VisionMLP if c.hidden_act == QUICK_GELU else GeluMLP
        h = mlp(c.intermediate_size, c.hidden_act, c.initializer_range, dt, pdt, name="mlp")(h)
        return constrain(x + h, _ACT)


class SiglipVisionEncoder(nn.Module):
    """pixel_values [batch, height, width, channels] -> features [batch, rows * cols, hidden]
    (rows, cols = config.grid(height, width), row-major) from layer `config.select_layer`;
    with feature='cls_patch' the [CLS] token comes first: [batch, 1 + rows * cols, hidden]."""

    config: SiglipVisionConfig

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Same as config.grid: the patch grid behind the returned token sequence."""
        return self.config.grid(height, width)

    def _check(self, pixel_values: jax.Array) -> tuple[int, int]:
        c = self.config
        shape = tuple(pixel_values.shape)
        if len(shape) != 4:
            raise ValueError(f"SiglipVisionEncoder: pixel_values must be [batch, height, width, "
                             f"{c.num_channels}] (NHWC), got rank {len(shape)} shape {shape}")
        if shape[-1] != c.num_channels:
            hint = " (looks like NCHW; transpose to NHWC)" if shape[1] == c.num_channels else ""
            raise ValueError(f"SiglipVisionEncoder: pixel_values must have {c.num_channels} "
                             f"channels last, got shape {shape}{hint}")
        if not jnp.issubdtype(pixel_values.dtype, jnp.floating):
            raise ValueError(f"SiglipVisionEncoder: pixel_values must be float (normalized "
                             f"pixels), got dtype {pixel_values.dtype}")
        return c.grid(shape[1], shape[2])

    def _positions(self, table: jax.Array, rows: int, cols: int) -> jax.Array:
        """Learned [cls? + native^2, embed] table -> [cls? + rows * cols, embed]: the patch
        grid resized as torch does, the [CLS] row (if any) kept as is."""
        g, n_cls = self.config.native_grid, int(self.config.class_token)
        if (rows, cols) == (g, g):
            return table
        grid = table[n_cls:].reshape(1, g, g, -1)  # [1, g, g, embed]
        out = resize_2d(grid.astype(jnp.float32), (rows, cols), self.config.pos_interp)
        out = out.reshape(rows * cols, -1).astype(table.dtype)
        return jnp.concatenate([table[:n_cls], out], axis=0)

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        rows, cols = self._check(pixel_values)
        c = self.config
        dt, pdt = parse_dtype(c.dtype), parse_dtype(c.param_dtype)
        init = nn.initializers.normal(c.initializer_range)
        x = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size,) * 2,
                    padding="VALID", use_bias=c.patch_bias, dtype=dt, param_dtype=pdt,
                    kernel_init=logical_init(init, (None, None, "conv", "embed")),
                    bias_init=logical_init(nn.initializers.zeros, ("embed",)),
                    name="patch_embed")(pixel_values.astype(dt))  # [batch, rows, cols, embed]
        x = x.reshape(x.shape[0], rows * cols, c.hidden_size)  # [batch, patches, embed]
        if c.class_token:
            cls = self.param("class_embed", logical_init(init, ("embed",)), (c.hidden_size,), pdt)
            cls = jnp.broadcast_to(cls.astype(dt), (x.shape[0], 1, c.hidden_size))
            x = jnp.concatenate([cls, x], axis=1)  # [batch, 1 + patches, embed]
        table = self.param("pos_embed", logical_init(init, ("pos", "embed")),
                           (c.num_positions, c.hidden_size), pdt)
        x = constrain(x + self._positions(table, rows, cols).astype(dt)[None], _ACT)
        if c.pre_layernorm:
            x = LayerNorm(c.layer_norm_eps, dtype=dt, param_dtype=pdt, name="pre_norm")(x)
        # At init every block (and the post-norm) is built so the tree always matches the full
        # checkpoint; at apply, blocks after the selected one are skipped.
        out = x
        for i in range(c.num_layers):
            if i >= c.layers_run and not self.is_initializing():
                break
            x = SiglipBlock(c, name=f"layers_{i}")(x)
            if i + 1 == c.layers_run:
                out = x
        post = LayerNorm(c.layer_norm_eps, dtype=dt, param_dtype=pdt, name="post_norm")
        if c.use_post_layernorm:
            out = post(out)
        elif self.is_initializing():
            post(out)
        if c.class_token and c.feature == "patch":
            out = out[:, 1:]  # [batch, patches, embed]
        return constrain(out, _ACT)
