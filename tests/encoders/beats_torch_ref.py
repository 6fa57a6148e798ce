"""PyTorch reference of unilm's BEATs (beats/BEATs.py, backbone.py, modules.py) for parity tests.

Written from unilm's computation (eval mode: no dropout / layerdrop), with unilm's module names
so `state_dict()` has the released checkpoints' keys (`encoder.pos_conv.0.weight_g`, a shared
`relative_attention_bias` listed under every layer, ...). torchaudio is not installed, so
`kaldi_fbank` re-states torchaudio.compliance.kaldi.fbank's float32 computation for BEATs'
arguments (povey window, preemphasis 0.97, DC removal, dither 0, power spectrum, snip_edges).
Independent of omni_jax's code.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

UNILM_DEFAULTS = dict(  # unilm BEATsConfig defaults
    input_patch_size=-1, embed_dim=512, conv_bias=False, encoder_layers=12,
    encoder_embed_dim=768, encoder_ffn_embed_dim=3072, encoder_attention_heads=12,
    activation_fn="gelu", layer_wise_gradient_decay_ratio=1.0, layer_norm_first=False,
    deep_norm=False, dropout=0.1, attention_dropout=0.1, activation_dropout=0.0,
    encoder_layerdrop=0.0, dropout_input=0.0, conv_pos=128, conv_pos_groups=16,
    relative_position_embedding=False, num_buckets=320, max_distance=1280, gru_rel_pos=False,
    finetuned_model=False, predictor_dropout=0.1, predictor_class=527)


def kaldi_fbank(wave: torch.Tensor, num_mel_bins: int = 128, sr: float = 16000.0,
                frame_length: float = 25.0, frame_shift: float = 10.0) -> torch.Tensor:
    """[samples] float32 -> [frames, mels], as torchaudio's kaldi.fbank with BEATs' arguments."""
    shift, size = int(sr * frame_shift * 0.001), int(sr * frame_length * 0.001)
    padded = 1 << (size - 1).bit_length()
    m = 1 + (wave.numel() - size) // shift
    frames = wave.as_strided((m, size), (shift, 1))
    frames = frames - frames.mean(dim=1, keepdim=True)
    prev = F.pad(frames.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)[:, :-1]
    frames = frames - 0.97 * prev
    frames = frames * torch.hann_window(size, periodic=False, dtype=wave.dtype).pow(0.85)
    frames = F.pad(frames, (0, padded - size))
    spectrum = torch.fft.rfft(frames).abs().pow(2.0)
    # mel banks (float32, as torchaudio's get_mel_banks)
    mel_scale = lambda f: 1127.0 * math.log(1.0 + f / 700.0)  # noqa: E731
    lo, hi = mel_scale(20.0), mel_scale(sr / 2)
    delta = (hi - lo) / (num_mel_bins + 1)
    b = torch.arange(num_mel_bins).unsqueeze(1)
    left, center, right = lo + b * delta, lo + (b + 1.0) * delta, lo + (b + 2.0) * delta
    mel = (1127.0 * (1.0 + (sr / padded) * torch.arange(padded // 2) / 700.0).log()).unsqueeze(0)
    banks = torch.max(torch.zeros(1), torch.min((mel - left) / (center - left),
                                                (right - mel) / (right - center)))
    banks = F.pad(banks.to(wave.dtype), (0, 1))
    energies = torch.mm(spectrum, banks.T)
    return torch.max(energies, torch.tensor(torch.finfo(torch.float).eps, dtype=wave.dtype)).log()


class SelfAttention(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        d, h = cfg["encoder_embed_dim"], cfg["encoder_attention_heads"]
        self.h, self.hd, self.cfg = h, d // h, cfg
        self.scaling = self.hd ** -0.5
        if cfg["relative_position_embedding"]:
            self.relative_attention_bias = nn.Embedding(cfg["num_buckets"], h)
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)
        if cfg["gru_rel_pos"]:
            self.grep_linear = nn.Linear(self.hd, 8)
            self.grep_a = nn.Parameter(torch.ones(1, h, 1, 1))

    def buckets(self, n: int) -> torch.Tensor:
        rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # memory - context
        nb = self.cfg["num_buckets"] // 2
        out = (rel > 0).to(torch.long) * nb
        rel = torch.abs(rel)
        exact = nb // 2
        large = exact + (torch.log(rel.float() / exact)
                         / math.log(self.cfg["max_distance"] / exact) * (nb - exact)).to(torch.long)
        large = torch.min(large, torch.full_like(large, nb - 1))
        return out + torch.where(rel < exact, rel, large)

    def forward(self, x, key_padding_mask, position_bias):  # x [T, B, C]
        t, b, c = x.shape
        if self.cfg["relative_position_embedding"] and position_bias is None:
            position_bias = self.relative_attention_bias(self.buckets(t)).permute(2, 0, 1)
            position_bias = position_bias.unsqueeze(0).repeat(b, 1, 1, 1).view(b * self.h, t, t)
        alpha = 32
        q = self.q_proj(x) * self.scaling / alpha
        k, v = self.k_proj(x), self.v_proj(x)
        q = q.contiguous().view(t, b * self.h, self.hd).transpose(0, 1)
        k = k.contiguous().view(t, b * self.h, self.hd).transpose(0, 1)
        v = v.contiguous().view(t, b * self.h, self.hd).transpose(0, 1)
        w = torch.bmm(q, k.transpose(1, 2))
        w = (w - w.max(dim=-1, keepdim=True)[0]) * alpha
        if key_padding_mask is not None:
            w = w.view(b, self.h, t, t).masked_fill(
                key_padding_mask.unsqueeze(1).unsqueeze(2).to(torch.bool), float("-inf"))
            w = w.view(b * self.h, t, t)
        if position_bias is not None:
            bias = position_bias
            if self.cfg["gru_rel_pos"]:
                ql = q.view(b, self.h, t, self.hd) * alpha / self.scaling
                ga, gb = torch.sigmoid(self.grep_linear(ql).view(b, self.h, t, 2, 4).sum(-1)
                                       ).chunk(2, dim=-1)
                gate = ga * (gb * self.grep_a - 1.0) + 2.0
                bias = gate.view(b * self.h, t, 1) * position_bias
            w = w + bias.view(w.size())
        p = F.softmax(w, dim=-1)
        out = torch.bmm(p, v).transpose(0, 1).contiguous().view(t, b, c)
        return self.out_proj(out), position_bias


ACTS = {"gelu": lambda x: F.gelu(x.float()).type_as(x), "relu": F.relu, "tanh": torch.tanh,
        "gelu_accurate": lambda x: F.gelu(x, approximate="tanh"), "linear": lambda x: x}


class Layer(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        d = cfg["encoder_embed_dim"]
        self.cfg = cfg
        self.self_attn = SelfAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg["encoder_ffn_embed_dim"])
        self.fc2 = nn.Linear(cfg["encoder_ffn_embed_dim"], d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.alpha = math.pow(2 * cfg["encoder_layers"], 0.25) if cfg["deep_norm"] else 1

    def forward(self, x, mask, pos_bias):
        act = ACTS[self.cfg["activation_fn"]]
        if self.cfg["layer_norm_first"]:
            a, pos_bias = self.self_attn(self.self_attn_layer_norm(x), mask, pos_bias)
            x = x + a
            return x + self.fc2(act(self.fc1(self.final_layer_norm(x)))), pos_bias
        a, pos_bias = self.self_attn(x, mask, pos_bias)
        x = self.self_attn_layer_norm(x * self.alpha + a)
        x = self.final_layer_norm(x * self.alpha + self.fc2(act(self.fc1(x))))
        return x, pos_bias


class SamePad(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.remove = 1 if k % 2 == 0 else 0

    def forward(self, x):
        return x[:, :, :-self.remove] if self.remove else x


class Encoder(nn.Module):
    def __init__(self, cfg: dict, parametrized_weight_norm: bool = False) -> None:
        super().__init__()
        d, k = cfg["encoder_embed_dim"], cfg["conv_pos"]
        self.cfg = cfg
        conv = nn.Conv1d(d, d, kernel_size=k, padding=k // 2, groups=cfg["conv_pos_groups"])
        nn.init.normal_(conv.weight, mean=0, std=math.sqrt(4 / (k * d)))
        nn.init.normal_(conv.bias, std=0.1)
        if parametrized_weight_norm:
            conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        else:  # the API unilm uses (deprecated in torch 2.x): keys weight_g / weight_v
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                conv = nn.utils.weight_norm(conv, name="weight", dim=2)
        self.pos_conv = nn.Sequential(conv, SamePad(k), nn.GELU())
        self.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg["encoder_layers"])])
        if cfg["relative_position_embedding"]:
            for layer in self.layers[1:]:
                del layer.self_attn.relative_attention_bias
                layer.self_attn.relative_attention_bias = \
                    self.layers[0].self_attn.relative_attention_bias
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, x, padding_mask=None):  # x [B, T, C]
        if padding_mask is not None:
            x = x.clone()
            x[padding_mask] = 0
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.cfg["layer_norm_first"]:
            x = self.layer_norm(x)
        x = x.transpose(0, 1)
        pos_bias = None
        for layer in self.layers:
            x, pos_bias = layer(x, padding_mask, pos_bias)
        x = x.transpose(0, 1)
        return self.layer_norm(x) if self.cfg["layer_norm_first"] else x


class BEATsRef(nn.Module):
    """unilm BEATs.extract_features (features only; a predictor head when finetuned_model)."""

    def __init__(self, cfg: dict, parametrized_weight_norm: bool = False) -> None:
        super().__init__()
        self.cfg = cfg = {**UNILM_DEFAULTS, **cfg}
        e, d, p = cfg["embed_dim"], cfg["encoder_embed_dim"], cfg["input_patch_size"]
        self.post_extract_proj = nn.Linear(e, d) if e != d else None
        self.patch_embedding = nn.Conv2d(1, e, kernel_size=p, stride=p, bias=cfg["conv_bias"])
        self.encoder = Encoder(cfg, parametrized_weight_norm)
        self.layer_norm = nn.LayerNorm(e)
        if cfg["finetuned_model"]:
            self.predictor = nn.Linear(d, cfg["predictor_class"])

    @staticmethod
    def forward_padding_mask(features, padding_mask):
        extra = padding_mask.size(1) % features.size(1)
        if extra > 0:
            padding_mask = padding_mask[:, :-extra]
        return padding_mask.view(padding_mask.size(0), features.size(1), -1).all(-1)

    def preprocess(self, source, mean=15.41663, std=6.55582):
        fbank = torch.stack([kaldi_fbank(w * 2 ** 15) for w in source])
        return (fbank - mean) / (2 * std)

    def forward(self, source, padding_mask=None):
        """source [B, samples] float32 -> (features [B, tokens, D], token padding mask)."""
        fbank = self.preprocess(source)
        if padding_mask is not None:
            padding_mask = self.forward_padding_mask(fbank, padding_mask)
        f = self.patch_embedding(fbank.unsqueeze(1))
        f = f.reshape(f.shape[0], f.shape[1], -1).transpose(1, 2)
        f = self.layer_norm(f)
        if padding_mask is not None:
            padding_mask = self.forward_padding_mask(f, padding_mask)
        if self.post_extract_proj is not None:
            f = self.post_extract_proj(f)
        return self.encoder(f, padding_mask), padding_mask


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.1) -> nn.Module:
    """Non-trivial values for every parameter (LayerNorm gains, biases, grep_a, weight_g)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            if name.endswith(("weight_g", "original0", "grep_a")) or "layer_norm.weight" in name:
                p.copy_(1.0 + noise)
            else:
                p.add_(noise)
    return model.eval()
