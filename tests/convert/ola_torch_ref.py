"""PyTorch reference of Ola's released model (SEEDS.md "Ola's released checkpoint"), for parity.

Written from SEEDS.md's description of Ola's code, with Ola's module names so `state_dict()` has
the released key layout: transformers' Qwen2ForCausalLM with `model.vision_tower.vision_tower`
(an Oryx-ViT: timm-style pre-norm blocks, fused qkv, exact GELU, no CLS / final norm, a square
learned position grid resized per image by F.interpolate bilinear, align_corners=False, no
antialias), `model.mm_projector` (ola_mlp: proj1, LGAP `pooler.predictor`, GELU, proj2, image
begin/newline/sep/end layout) and `model.speech_projector` (drop frames % k, group k frames,
linear1-ReLU-linear2, newline per chunk, begin/end). The dual audio encoder is transformers'
WhisperEncoder (from the same weights as the OpenAI .pt) ++ BEATsRef (tests/encoders), the
shorter zero-padded at the end. Independent of omni_jax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder


class OryxAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class OryxMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class OryxBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = OryxAttention(dim, heads), OryxMlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)


class OryxViT(nn.Module):
    """pixels [B, 3, H, W] -> last block's patch tokens [B, (H/p)(W/p), C] and the grid."""

    def __init__(self, dim: int, layers: int, heads: int, hidden: int, patch: int,
                 grid: int = 128) -> None:
        super().__init__()
        self.patch, self.grid = patch, grid
        self.patch_embed = PatchEmbed(dim, patch)
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid, dim) * 0.02)
        self.blocks = nn.ModuleList([OryxBlock(dim, heads, hidden) for _ in range(layers)])

    def positions(self, h: int, w: int) -> torch.Tensor:
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        pe = self.pos_embed[0].T.reshape(1, -1, self.grid, self.grid)  # row-major grid
        pe = F.interpolate(pe, (h, w), mode="bilinear", align_corners=False, antialias=False)
        return pe.reshape(1, -1, h * w).transpose(1, 2)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = pixels.shape[2] // self.patch, pixels.shape[3] // self.patch
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = x + self.positions(h, w)
        for blk in self.blocks:
            x = blk(x)
        return x, (h, w)


class Pooler(nn.Module):
    """LGAP over 2x2 windows: per-channel softmax of predictor([f_i ; mean]) over the window."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.predictor = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        b, h, w, c = x.shape
        f = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
        f = f.reshape(b, h // 2, w // 2, 4, c)
        g = f.mean(-2, keepdim=True).expand(-1, -1, -1, 4, -1)
        score = F.softmax(self.predictor(torch.cat([f, g], dim=-1)), dim=-2)
        return (f * score).sum(dim=-2)


class OlaMLP(nn.Module):
    def __init__(self, vis_dim: int, dim: int) -> None:
        super().__init__()
        self.proj1, self.proj2 = nn.Linear(vis_dim, dim), nn.Linear(dim, dim)
        self.pooler = Pooler(dim)
        std = 1 / math.sqrt(dim)
        for name in ("image_newline", "image_begin", "image_end", "image_sep"):
            setattr(self, name, nn.Parameter(torch.randn(dim) * std))

    def rows(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b = x.shape[0]
        x = self.proj2(F.gelu(self.pooler(self.proj1(x.reshape(b, *size, -1)))))
        _, h, w, c = x.shape
        nl = self.image_newline.reshape(1, 1, 1, c).expand(b, h, 1, c)
        return torch.cat([x, nl], dim=2).reshape(b, -1, c)

    def forward(self, x, size, x2=None, size2=None) -> torch.Tensor:
        """[begin] rows+NL ([sep] rows2+NL) [end] for x [B, h*w, C] (+ second view x2)."""
        out = self.rows(x, size)
        b, c = out.shape[0], out.shape[-1]
        if x2 is not None:
            out = torch.cat([out, self.image_sep.reshape(1, 1, c).expand(b, 1, c),
                             self.rows(x2, size2)], dim=1)
        return torch.cat([self.image_begin.reshape(1, 1, c).expand(b, 1, c), out,
                          self.image_end.reshape(1, 1, c).expand(b, 1, c)], dim=1)


class SpeechProjector(nn.Module):
    def __init__(self, enc_dim: int, k: int, hidden: int, dim: int) -> None:
        super().__init__()
        self.k = k
        self.linear1, self.linear2 = nn.Linear(enc_dim * k, hidden), nn.Linear(hidden, dim)
        std = 1 / math.sqrt(dim)
        for name in ("speech_newline", "speech_begin", "speech_end"):
            setattr(self, name, nn.Parameter(torch.randn(dim) * std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [chunks, frames, enc_dim] -> [N, D]
        n, t, c = x.shape
        x = x[:, : t - t % self.k].reshape(n, t // self.k, c * self.k)
        x = self.linear2(F.relu(self.linear1(x)))
        x = torch.cat([x, self.speech_newline.reshape(1, 1, -1).expand(n, 1, -1)], dim=1)
        return torch.cat([self.speech_begin[None], x.flatten(0, 1), self.speech_end[None]])


class Holder(nn.Module):
    """`model.vision_tower` of Ola's code: the ViT lives one level down (doubled name)."""

    def __init__(self, vit: OryxViT) -> None:
        super().__init__()
        self.vision_tower = vit


def build_ola(llm: dict, vit: dict, vis_dim: int, enc_dim: int, k: int,
              speech_hidden: int) -> Qwen2ForCausalLM:
    """Qwen2ForCausalLM + Ola's vision tower / projectors under Ola's module names."""
    lm = Qwen2ForCausalLM(Qwen2Config(**llm))
    lm.model.add_module("vision_tower", Holder(OryxViT(**vit)))
    lm.model.add_module("mm_projector", OlaMLP(vis_dim, llm["hidden_size"]))
    lm.model.add_module("speech_projector",
                        SpeechProjector(enc_dim, k, speech_hidden, llm["hidden_size"]))
    return lm


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.1) -> nn.Module:
    """Noise on every parameter (norm gains around 1) so swapped or dropped tensors show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            if name.endswith(("norm.weight", "layernorm.weight", "norm1.weight",
                              "norm2.weight", "layer_norm.weight")):
                p.copy_(1.0 + noise)
            else:
                p.add_(noise)
    return model.eval()


# transformers WhisperEncoder names -> OpenAI whisper names (under `encoder.`)
_TO_OPENAI = (("layers.", "blocks."), (".self_attn.q_proj.", ".attn.query."),
              (".self_attn.k_proj.", ".attn.key."), (".self_attn.v_proj.", ".attn.value."),
              (".self_attn.out_proj.", ".attn.out."), (".self_attn_layer_norm.", ".attn_ln."),
              (".fc1.", ".mlp.0."), (".fc2.", ".mlp.2."), (".final_layer_norm.", ".mlp_ln."))


def whisper_encoder(mels: int, width: int, layers: int, heads: int, ctx: int,
                    seed: int = 0) -> WhisperEncoder:
    cfg = WhisperConfig(num_mel_bins=mels, d_model=width, encoder_layers=layers,
                        encoder_attention_heads=heads, encoder_ffn_dim=4 * width,
                        max_source_positions=ctx, decoder_layers=1, decoder_attention_heads=heads,
                        decoder_ffn_dim=4 * width, vocab_size=64, max_target_positions=ctx)
    enc = WhisperEncoder(cfg)
    return randomize(enc, seed)


def whisper_pt(enc: WhisperEncoder) -> dict:
    """{"dims", "model_state_dict"} as OpenAI's whisper saves it (encoder only)."""
    sd = {}
    for k, v in enc.state_dict().items():
        if k == "embed_positions.weight":
            k = "positional_embedding"
        elif k.startswith("layer_norm."):
            k = k.replace("layer_norm.", "ln_post.")
        else:
            for old, new in _TO_OPENAI:
                k = k.replace(old, new)
        sd["encoder." + k] = v.clone()
    c = enc.config
    dims = dict(n_mels=c.num_mel_bins, n_audio_ctx=c.max_source_positions,
                n_audio_state=c.d_model, n_audio_head=c.encoder_attention_heads,
                n_audio_layer=c.encoder_layers, n_vocab=64, n_text_ctx=8, n_text_state=c.d_model,
                n_text_head=c.encoder_attention_heads, n_text_layer=1)
    return {"dims": dims, "model_state_dict": sd}


@torch.no_grad()
def dual_audio(whisper: WhisperEncoder, beats: nn.Module, mel: torch.Tensor,
               wave: torch.Tensor) -> torch.Tensor:
    """mel [chunks, mels, frames], wave [chunks, samples] -> [chunks, T, Cw + Cb] (Ola's dual)."""
    w = whisper(mel).last_hidden_state
    b, _ = beats(wave)
    t = max(w.shape[1], b.shape[1])
    w, b = (F.pad(x, (0, 0, 0, t - x.shape[1])) for x in (w, b))
    return torch.cat([w, b], dim=-1)


@torch.no_grad()
def ola_logits(lm: Qwen2ForCausalLM, ids: torch.Tensor, image_at: int, pixels: torch.Tensor,
               speech_at: int, speech: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """ids [1, S]; the image's tokens replace ids[image_at: ...], the speech tokens those at
    speech_at (text order). pixels [1, 3, H, W] normalized; speech = dual_audio(...).
    Returns (logits [1, S, V], image tokens, speech tokens)."""
    m = lm.model
    x = m.embed_tokens(ids).clone()
    feats, size = m.vision_tower.vision_tower(pixels)
    img = m.mm_projector(feats, size)[0]
    sp = m.speech_projector(speech)
    x[0, image_at:image_at + img.shape[0]] = img
    x[0, speech_at:speech_at + sp.shape[0]] = sp
    return lm(inputs_embeds=x).logits, img.shape[0], sp.shape[0]


@torch.no_grad()
def two_view(lm: Qwen2ForCausalLM, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """[begin] low-res rows [sep] high-res rows [end] of one image's two views [1, 3, h, w]."""
    vit, proj = lm.model.vision_tower.vision_tower, lm.model.mm_projector
    (f1, s1), (f2, s2) = vit(low), vit(high)
    return proj(f1, s1, f2, s2)[0]
