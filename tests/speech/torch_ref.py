"""PyTorch reference of OpenOmni's speech generator, written from SEEDS.md's description.

`TorchSpeechGenerator(config)` has the released code's state-dict keys (relative to
`speech_generator.`): llm_embedding, input_proj.gate.fc / input_proj.experts.{e}.fc1|fc2,
fusion.layers.{l}.0.{norm_text,norm_image,to_q,to_kv,to_out}, fusion.layers.{l}.1.{0,1,3},
fusion.norm, llm.model (a transformers Qwen2ForCausalLM: llm.model.model.*,
llm.model.lm_head.weight), llm_decoder. Not in SEEDS.md (our choice, for the AR mode and the
plain-MLP expansion): input_proj.{0,2} (nn.Sequential), ar_embedding, unit_embedding.

It processes the batch item by item like the released code (boolean row selection, per-item
concatenation, pad_sequence) and runs the decoder with an attention mask.
`to_jax_params(model)` maps its weights into omni_jax's SpeechGenerator parameter tree.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import Qwen2Config, Qwen2ForCausalLM

from omni_jax.convert.qwen2 import config_to_hf, params_from_hf
from omni_jax.speech.config import SpeechGenConfig


class _Gate(nn.Module):
    def __init__(self, dim: int, experts: int):
        super().__init__()
        self.fc = nn.Linear(dim, experts)


class _Expert(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, out)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class SoftMoETorch(nn.Module):
    """sum_e softmax(gate(x))_e * expert_e(x)."""

    def __init__(self, dim: int, hidden: int, out: int, experts: int):
        super().__init__()
        self.gate = _Gate(dim, experts)
        self.experts = nn.ModuleList([_Expert(dim, hidden, out) for _ in range(experts)])

    def forward(self, x):
        g = torch.softmax(self.gate.fc(x), dim=-1)
        return sum(g[..., e:e + 1] * expert(x) for e, expert in enumerate(self.experts))


class CrossAttn(nn.Module):
    """norm_image normalizes the queries, norm_text the keys (their naming)."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.heads, self.scale = heads, head_dim ** -0.5
        self.norm_text, self.norm_image = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, queries, keys, key_mask):  # [b, s, n], [b, k, n], [b, k] bool
        q = self.to_q(self.norm_image(queries))
        k, v = self.to_kv(self.norm_text(keys)).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        sim = torch.einsum("bhid,bhjd->bhij", q, k) * self.scale
        sim = sim.masked_fill(~key_mask[:, None, None, :], -torch.finfo(sim.dtype).max)
        out = torch.einsum("bhij,bhjd->bhid", sim.softmax(dim=-1), v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class Fusion(nn.Module):
    def __init__(self, c: SpeechGenConfig):
        super().__init__()
        n = c.width
        self.layers = nn.ModuleList([nn.ModuleList([
            CrossAttn(n, c.fusion_heads, c.fusion_head_dim, c.norm_eps),
            nn.Sequential(nn.LayerNorm(n, eps=c.norm_eps),
                          nn.Linear(n, c.fusion_ff_mult * n, bias=False), nn.GELU(),
                          nn.Linear(c.fusion_ff_mult * n, n, bias=False))])
            for _ in range(c.fusion_layers)])
        self.norm = nn.LayerNorm(n, eps=c.norm_eps)

    def forward(self, queries, keys, key_mask):
        for attn, ff in self.layers:
            queries = queries + attn(queries, keys, key_mask)
            queries = queries + ff(queries)
        return self.norm(queries)


class _Holder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


def qwen2_config(c: SpeechGenConfig) -> Qwen2Config:
    hf = config_to_hf(c.decoder)
    hf.pop("architectures", None)
    return Qwen2Config(**hf, attn_implementation="eager")


class TorchSpeechGenerator(nn.Module):
    """forward(hidden, row_mask, text_ids, text_mask, units=None, unit_mask=None) -> dict."""

    def __init__(self, c: SpeechGenConfig):
        super().__init__()
        if c.moe == "sparse":
            raise ValueError("TorchSpeechGenerator: the sparse MoE has no reference here")
        self.c, n, feats = c, c.width, c.expansion * c.width
        self.llm_embedding = nn.Embedding(2, c.llm_hidden)
        if c.moe == "soft":
            self.input_proj = SoftMoETorch(c.llm_hidden, c.expert_hidden, feats, c.num_experts)
        else:
            self.input_proj = nn.Sequential(nn.Linear(c.llm_hidden, c.expert_hidden), nn.ReLU(),
                                            nn.Linear(c.expert_hidden, feats))
        self.fusion = Fusion(c)
        self.llm = _Holder(Qwen2ForCausalLM(qwen2_config(c)))
        self.llm_decoder = nn.Linear(n, c.unit_vocab + 1)
        if c.segment_positions:  # our option (not OpenOmni's): a frame's place in its segment
            self.segment_pos = nn.Embedding(c.upsample, n)
        if c.mode == "ar":
            self.ar_embedding = nn.Embedding(2, n)
            self.unit_embedding = nn.Embedding(c.unit_vocab + 1, n)

    def fuse(self, hidden, row_mask, text_ids):
        """Fused response text [b, s, N] (padded query rows are unused)."""
        c = self.c
        sos, task = self.llm_embedding.weight[0:1], self.llm_embedding.weight[1:2]
        framed = [torch.cat([sos, h[m], task]) for h, m in zip(hidden, row_mask.bool())]
        lens = torch.tensor([len(f) for f in framed])
        keys = self.input_proj(pad_sequence(framed, batch_first=True))
        keys = rearrange(keys, "b n (d1 d2) -> b (n d2) d1", d2=c.expansion)
        key_mask = torch.arange(keys.shape[1])[None] < (c.expansion * lens)[:, None]
        queries = self.llm.model.get_input_embeddings()(text_ids)
        return self.fusion(queries, keys, key_mask)

    def _decode(self, embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        lens = torch.tensor([len(e) for e in embeds])
        x = pad_sequence(embeds, batch_first=True)
        mask = (torch.arange(x.shape[1])[None] < lens[:, None]).long()
        h = self.llm.model.model(inputs_embeds=x, attention_mask=mask).last_hidden_state
        return self.llm_decoder(h).float(), lens

    def forward(self, hidden, row_mask, text_ids, text_mask, units=None, unit_mask=None):
        c = self.c
        fused = self.fuse(hidden, row_mask, text_ids)
        s_len = text_mask.long().sum(-1)
        if units is not None and unit_mask is None:
            unit_mask = torch.ones_like(units, dtype=torch.bool)
        u_len = torch.zeros_like(s_len) if units is None else unit_mask.long().sum(-1)
        if c.mode == "ar":
            emb = [torch.cat([self.ar_embedding.weight[0:1], fused[b, :s_len[b]],
                              self.ar_embedding.weight[1:2],
                              self.unit_embedding(units[b, :u_len[b]]) if units is not None
                              else fused[b, :0]]) for b in range(len(fused))]
            logits, lens = self._decode(emb)
            return {"speech_ar_logits": logits, "lengths": lens}
        up = c.upsample * s_len if units is None else torch.maximum(c.upsample * s_len, u_len)
        ratio = up / s_len  # long / long: float32, as the released code
        reps = []
        for b in range(len(fused)):
            idx = (torch.arange(int(up[b])) / ratio[b]).long()
            rep = fused[b, :s_len[b]][idx]
            if c.segment_positions:  # frame j of a segment of n frames: bin j * upsample // n
                bins = torch.cat([torch.arange(n) * c.upsample // n
                                  for n in torch.bincount(idx).tolist()])
                rep = rep + self.segment_pos(bins)
            reps.append(rep)
        logits, lens = self._decode(reps)
        return {"speech_log_probs": F.log_softmax(logits, dim=-1), "speech_frames": lens}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def to_jax_params(model: TorchSpeechGenerator) -> dict[str, Any]:
    """Its weights as omni_jax SpeechGenerator variables {"params": ...}."""
    c, sd = model.c, {k: _np(v) for k, v in model.state_dict().items()}
    n, h, hd = c.width, c.fusion_heads, c.fusion_head_dim
    p: dict[str, Any] = {"llm_embedding": {"embedding": sd["llm_embedding.weight"]}}
    if c.moe == "soft":
        ex = range(c.num_experts)
        stack = lambda f: np.stack([f(e) for e in ex])  # noqa: E731
        p["input_proj"] = {
            "gate": {"kernel": sd["input_proj.gate.fc.weight"].T,
                     "bias": sd["input_proj.gate.fc.bias"]},
            "fc1_kernel": stack(lambda e: sd[f"input_proj.experts.{e}.fc1.weight"].T),
            "fc1_bias": stack(lambda e: sd[f"input_proj.experts.{e}.fc1.bias"]),
            "fc2_kernel": stack(lambda e: sd[f"input_proj.experts.{e}.fc2.weight"].T),
            "fc2_bias": stack(lambda e: sd[f"input_proj.experts.{e}.fc2.bias"])}
    else:
        p["input_proj"] = {f"fc{i}": {"kernel": sd[f"input_proj.{j}.weight"].T,
                                      "bias": sd[f"input_proj.{j}.bias"]}
                           for i, j in ((1, 0), (2, 2))}
    ln = lambda k: {"scale": sd[k + ".weight"], "bias": sd[k + ".bias"]}  # noqa: E731
    fusion: dict[str, Any] = {"norm": ln("fusion.norm")}
    for i in range(c.fusion_layers):
        a, f = f"fusion.layers.{i}.0.", f"fusion.layers.{i}.1."
        fusion[f"layers_{i}"] = {
            "attn": {"norm_q": ln(a + "norm_image"), "norm_kv": ln(a + "norm_text"),
                     "to_q": {"kernel": sd[a + "to_q.weight"].T.reshape(n, h, hd)},
                     "to_kv": {"kernel": sd[a + "to_kv.weight"].T.reshape(n, 2, h, hd)},
                     "to_out": {"kernel": sd[a + "to_out.weight"].T.reshape(h, hd, n)}},
            "ff": {"norm": ln(f + "0"), "fc1": {"kernel": sd[f + "1.weight"].T},
                   "fc2": {"kernel": sd[f + "3.weight"].T}}}
    p["fusion"] = fusion
    llm = {k[len("llm.model."):]: v for k, v in sd.items() if k.startswith("llm.model.")}
    p["llm"] = params_from_hf(c.decoder, llm)["params"]
    p["llm"].pop("lm_head", None)  # the generator never uses the decoder's LM head
    p["llm_decoder"] = {"kernel": sd["llm_decoder.weight"].T, "bias": sd["llm_decoder.bias"]}
    if c.segment_positions:
        p["segment_pos"] = {"embedding": sd["segment_pos.weight"]}
    if c.mode == "ar":
        p["ar_embedding"] = {"embedding": sd["ar_embedding.weight"]}
        p["unit_embedding"] = {"embedding": sd["unit_embedding.weight"]}
    return {"params": p}
