"""PyTorch reference of the DiT image decoder, written from its description (not from dit.py).

Layout like facebookresearch/DiT: Conv2d patch embedding (NCHW images), fixed 2-D sin-cos (or
learned) positions, t_embedder (sinusoidal cos|sin -> Linear -> SiLU -> Linear), blocks with
norm1 / norm2 (no affine), fused qkv self-attention, cross-attention (norm_cross, q + fused kv),
GELU(tanh) MLP, adaLN_modulation (SiLU -> Linear(6 d)) chunked shift/scale/gate (msa, mlp);
final layer (norm, adaLN 2 d, linear) and unpatchify to NCHW. Conditioning: a learned null
sequence swapped in per item by `drop`, then a Linear-GELU(tanh)-Linear projector.

`to_flax_params(model, config)` maps its state dict to omni_jax's DiT parameter tree.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omni_jax.decoders.config import DecoderConfig


def sincos_positions(grid: int, dim: int, max_period: float) -> torch.Tensor:
    """[grid^2, dim]: token (r, c) row-major -> [sin(r w), cos(r w), sin(c w), cos(c w)]."""
    quarter = dim // 4
    w = 1.0 / max_period ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    r, c = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                          torch.arange(grid, dtype=torch.float64), indexing="ij")
    r, c = r.flatten()[:, None] * w, c.flatten()[:, None] * w
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1).float()


class TorchDiTBlock(nn.Module):
    def __init__(self, c: DecoderConfig):
        super().__init__()
        d, self.c = c.hidden, c
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=c.norm_eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm_cross = nn.LayerNorm(d, eps=c.norm_eps)
        self.cross_q = nn.Linear(d, d)
        self.cross_kv = nn.Linear(d, 2 * d)
        self.cross_proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=c.norm_eps)
        self.fc1 = nn.Linear(d, c.mlp_hidden)
        self.fc2 = nn.Linear(c.mlp_hidden, d)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def heads(self, x: torch.Tensor) -> torch.Tensor:  # [b, n, d] -> [b, heads, n, head_dim]
        b, n, _ = x.shape
        return x.view(b, n, self.c.heads, self.c.head_dim).transpose(1, 2)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = x.shape
        return x.transpose(1, 2).reshape(b, n, self.c.hidden)

    def forward(self, x, c, y, mask):
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        h = self.norm1(x) * (1 + sc1[:, None]) + sh1[:, None]
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(self.heads(q), self.heads(k), self.heads(v))
        x = x + g1[:, None] * self.proj(self.merge(a))
        h = self.norm_cross(x)
        k, v = self.cross_kv(y).chunk(2, dim=-1)
        a = F.scaled_dot_product_attention(self.heads(self.cross_q(h)), self.heads(k),
                                           self.heads(v), attn_mask=mask[:, None, None, :])
        x = x + self.cross_proj(self.merge(a))
        h = self.norm2(x) * (1 + sc2[:, None]) + sh2[:, None]
        return x + g2[:, None] * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class TorchDiT(nn.Module):
    """forward(x [b, C, H, W], t [b], cond [b, L, cond_dim], mask [b, L] bool, drop [b] bool)."""

    def __init__(self, c: DecoderConfig):
        super().__init__()
        d, self.c = c.hidden, c
        self.x_embedder = nn.Conv2d(c.channels, d, c.patch_size, stride=c.patch_size)
        if c.pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_positions(c.grid, d, c.pos_max_period))
        else:
            self.pos_embed = nn.Parameter(0.02 * torch.randn(c.num_patches, d))
        self.t_embedder = nn.Sequential(nn.Linear(c.time_freq_dim, d), nn.SiLU(),
                                        nn.Linear(d, d))
        self.null_cond = nn.Parameter(0.02 * torch.randn(c.cond_len, c.cond_dim))
        self.y_embedder = nn.Sequential(nn.Linear(c.cond_dim, d), nn.GELU(approximate="tanh"),
                                        nn.Linear(d, d))
        self.blocks = nn.ModuleList([TorchDiTBlock(c) for _ in range(c.layers)])
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=c.norm_eps)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.final_linear = nn.Linear(d, c.patch_dim)

    def t_features(self, t: torch.Tensor) -> torch.Tensor:
        half = self.c.time_freq_dim // 2
        freqs = torch.exp(-math.log(self.c.time_max_period) *
                          torch.arange(half, dtype=torch.float32) / half)
        a = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)

    def forward(self, x, t, cond, mask, drop=None):
        c, p = self.c, self.c.patch_size
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed[None]
        temb = self.t_embedder(self.t_features(t))
        mask = mask.bool()
        if drop is not None:
            cond = torch.where(drop[:, None, None], self.null_cond[None], cond)
            mask = mask | drop[:, None]
        y = self.y_embedder(cond)
        for blk in self.blocks:
            h = blk(h, temb, y, mask)
        shift, scale = self.final_adaLN(temb).chunk(2, dim=1)
        h = self.final_linear(self.norm_final(h) * (1 + scale[:, None]) + shift[:, None])
        b, g = h.shape[0], c.grid
        h = h.reshape(b, g, g, p, p, c.channels)
        return torch.einsum("bhwpqc->bchpwq", h).reshape(b, c.channels, g * p, g * p)


def to_flax_params(model: TorchDiT, c: DecoderConfig) -> dict:
    """TorchDiT weights -> the {'params': ...} tree of omni_jax.decoders.dit.DiT(c)."""
    sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    d, h, hd = c.hidden, c.heads, c.head_dim

    def dense(w: str) -> dict:
        return {"kernel": sd[w + ".weight"].T, "bias": sd[w + ".bias"]}

    def heads_in(w: np.ndarray, b: np.ndarray) -> dict:  # Linear(.. -> d) as [in, heads, hd]
        return {"kernel": w.T.reshape(-1, h, hd), "bias": b.reshape(h, hd)}

    def heads_out(w: np.ndarray, b: np.ndarray) -> dict:
        return {"kernel": w.T.reshape(h, hd, d), "bias": b}

    conv = sd["x_embedder.weight"]  # [d, C, p, p] -> [(p, p, C), d]
    out = {"patch_embed": {"kernel": conv.transpose(2, 3, 1, 0).reshape(-1, d),
                           "bias": sd["x_embedder.bias"]},
           "time_fc1": dense("t_embedder.0"), "time_fc2": dense("t_embedder.2"),
           "null_cond": sd["null_cond"],
           "cond_proj": {"fc1": dense("y_embedder.0"), "fc2": dense("y_embedder.2")},
           "final_modulation": dense("final_adaLN.1"), "final_linear": dense("final_linear")}
    if c.pos_embed == "learned":
        out["pos_embed"] = sd["pos_embed"]
    for i in range(c.layers):
        pre = f"blocks.{i}."
        qkv_w, qkv_b = sd[pre + "qkv.weight"], sd[pre + "qkv.bias"]
        kv_w, kv_b = sd[pre + "cross_kv.weight"], sd[pre + "cross_kv.bias"]
        out[f"block_{i}"] = {
            "modulation": dense(pre + "adaLN_modulation.1"),
            "attn": {n: heads_in(qkv_w[j * d:(j + 1) * d], qkv_b[j * d:(j + 1) * d])
                     for j, n in enumerate("qkv")}
            | {"o": heads_out(sd[pre + "proj.weight"], sd[pre + "proj.bias"])},
            "cross_norm": {"scale": sd[pre + "norm_cross.weight"],
                           "bias": sd[pre + "norm_cross.bias"]},
            "cross": {"q": heads_in(sd[pre + "cross_q.weight"], sd[pre + "cross_q.bias"]),
                      "k": heads_in(kv_w[:d], kv_b[:d]), "v": heads_in(kv_w[d:], kv_b[d:]),
                      "o": heads_out(sd[pre + "cross_proj.weight"], sd[pre + "cross_proj.bias"])},
            "mlp": {"fc1": dense(pre + "fc1"), "fc2": dense(pre + "fc2")},
        }
    return {"params": out}
