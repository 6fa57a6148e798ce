"""SpeechGenConfig: OpenOmni-style speech-unit generator hyper-parameters, presets, checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from omni_jax.config_base import StrictConfig, check_choice, check_positive
from omni_jax.llm.config import LLMConfig

MODES = ("ctc", "ar")
EXPANSIONS = ("soft", "sparse", "mlp")
_DEFAULT_EXPANSION = {"ctc": "soft", "ar": "mlp"}


def _tiny_decoder(text_vocab: int) -> LLMConfig:
    """A 2-layer, 32-wide decoder for tests and demos."""
    return LLMConfig(vocab_size=text_vocab, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10_000.0,
                     tie_word_embeddings=True, qkv_bias=True)


@dataclasses.dataclass(frozen=True)
class SpeechGenConfig(StrictConfig):
    """LLM hidden states + response text -> speech units (CTC over upsampled frames, or AR).

    The generator width N is `decoder.hidden_size`; its token table embeds the response text.
    Blank (CTC) and EOS (AR) are both the extra last index `unit_vocab`.
    """

    mode: str = "ctc"  # "ctc" (non-autoregressive) | "ar" (next-unit)
    llm_hidden: int = 64  # H: width of the LLM hidden states the generator reads
    unit_vocab: int = 64  # V: speech units; index V is the CTC blank / the AR EOS
    expansion: int = 4  # sub-tokens per LLM row (interleaved channel split)
    moe: str | None = None  # "soft" | "sparse" | "mlp"; None: soft for ctc, mlp for ar
    num_experts: int = 4
    expert_hidden: int | None = None  # expert / MLP inner width; None: expansion * N
    # sparse MoE only (see moe_config): Dense(H -> e N), then SwiGLU experts of expert_hidden
    moe_top_k: int = 2
    moe_norm_topk_prob: bool = False
    moe_shared_hidden: int = 0  # shared expert width; 0 = none
    moe_capacity_factor: float | None = None  # None: no token dropping
    moe_group_size: int = 0  # tokens per dispatch group; 0 = one group per batch item
    fusion_layers: int = 2
    fusion_heads: int = 16
    fusion_head_dim: int = 256
    fusion_ff_mult: int = 4
    norm_eps: float = 1e-5  # fusion LayerNorms
    upsample: int = 12  # CTC frames per response token (before stretching to the units)
    # CTC only: add a learned embedding of each frame's place in its token's segment
    # (`upsample` bins of offset / segment length) to the upsampled frames. Off (OpenOmni's
    # code): a segment's frames are copies of one vector and the decoder (causal, RoPE only)
    # gives the first token's frames identical outputs, so greedy CTC emits at most one unit
    # there: a one-token answer ("two") can never be voiced
    segment_positions: bool = False
    decoder: LLMConfig = dataclasses.field(default_factory=lambda: _tiny_decoder(256))
    sample_top_p: float = 0.8  # AR sampling defaults (used by the sampler)
    sample_top_k: int = 25
    repetition_window: int = 10
    repetition_ratio: float = 0.1  # RAS: resample when a unit fills this share of the window

    def __post_init__(self) -> None:
        who = "SpeechGenConfig"
        check_choice(who, "mode", self.mode, MODES)
        if self.moe is None:
            object.__setattr__(self, "moe", _DEFAULT_EXPANSION[self.mode])
        check_choice(who, "moe", self.moe, EXPANSIONS)
        if not isinstance(self.decoder, LLMConfig):
            raise ValueError(f"{who}.decoder must be an LLMConfig (from_dict coerces dicts), "
                             f"got {type(self.decoder).__name__}")
        if self.expert_hidden is None:
            object.__setattr__(self, "expert_hidden", self.expansion * self.width)
        check_positive(who, llm_hidden=self.llm_hidden, unit_vocab=self.unit_vocab,
                       expansion=self.expansion, num_experts=self.num_experts,
                       expert_hidden=self.expert_hidden, fusion_layers=self.fusion_layers,
                       fusion_heads=self.fusion_heads, fusion_head_dim=self.fusion_head_dim,
                       fusion_ff_mult=self.fusion_ff_mult, norm_eps=self.norm_eps,
                       upsample=self.upsample, sample_top_p=self.sample_top_p,
                       sample_top_k=self.sample_top_k)
        if self.segment_positions and self.mode != "ctc":
            raise ValueError(f"{who}.segment_positions applies to CTC frames (mode='ctc'), got "
                             f"mode={self.mode!r}")
        if self.moe == "sparse" and not 1 <= self.moe_top_k <= self.num_experts:
            raise ValueError(f"{who}.moe_top_k must be in [1, num_experts={self.num_experts}], "
                             f"got {self.moe_top_k}")
        if self.moe_shared_hidden < 0 or self.moe_group_size < 0:
            raise ValueError(f"{who}.moe_shared_hidden and moe_group_size must be >= 0, got "
                             f"{self.moe_shared_hidden}, {self.moe_group_size}")
        if self.sample_top_p > 1:
            raise ValueError(f"{who}.sample_top_p must be in (0, 1], got {self.sample_top_p}")
        if not 0 < self.repetition_ratio <= 1:
            raise ValueError(f"{who}.repetition_ratio must be in (0, 1], got "
                             f"{self.repetition_ratio}")
        if self.repetition_window < 0:
            raise ValueError(f"{who}.repetition_window must be >= 0, got "
                             f"{self.repetition_window}")

    @property
    def width(self) -> int:
        """N: the generator width (fusion, decoder)."""
        return self.decoder.hidden_size

    def moe_config(self) -> Any:
        """The layers.moe.MoEConfig of the sparse expansion (imported lazily)."""
        from omni_jax.layers.moe import MoEConfig

        d = self.decoder
        return MoEConfig(num_experts=self.num_experts, top_k=self.moe_top_k,
                         expert_hidden=self.expert_hidden, norm_topk_prob=self.moe_norm_topk_prob,
                         shared_expert_hidden=self.moe_shared_hidden,
                         capacity_factor=self.moe_capacity_factor,
                         group_size=self.moe_group_size, init_std=d.initializer_range,
                         dtype=d.dtype, param_dtype=d.param_dtype)

    @property
    def num_outputs(self) -> int:
        """V + 1: unit logits including the blank / EOS."""
        return self.unit_vocab + 1

    @classmethod
    def _coerce(cls, d: dict[str, Any]) -> dict[str, Any]:
        """from_dict: a nested dict for `decoder`."""
        if isinstance(d.get("decoder"), Mapping):
            d["decoder"] = LLMConfig.from_dict(d["decoder"])
        return d


def _paper_decoder(text_vocab: int) -> LLMConfig:
    """Qwen2.5-0.5B shape (the released generator's transformer)."""
    return LLMConfig(vocab_size=text_vocab, hidden_size=896, intermediate_size=4864,
                     num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                     rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                     qkv_bias=True)


_PRESETS = {
    # name: (decoder builder, default text vocab, {mode: unit vocab}, fusion heads, head_dim)
    "paper": (_paper_decoder, 151936, {"ctc": 6561, "ar": 16384}, 16, 256),
    "tiny": (_tiny_decoder, 256, {"ctc": 40, "ar": 48}, 4, 8),
}


def speech_preset(name: str, llm_hidden: int, mode: str = "ctc", text_vocab: int | None = None,
                  **overrides: Any) -> SpeechGenConfig:
    """'paper' (N = 896, Qwen2.5-0.5B-shaped decoder) or 'tiny'; text_vocab sets the decoder's
    token table (default 151936 / 256) so it can match the main LLM's tokenizer."""
    if name not in _PRESETS:
        raise ValueError(f"unknown speech preset {name!r}; expected one of {sorted(_PRESETS)}")
    check_choice("speech_preset", "mode", mode, MODES)
    build, vocab, units, heads, head_dim = _PRESETS[name]
    kw: dict[str, Any] = dict(mode=mode, llm_hidden=llm_hidden, unit_vocab=units[mode],
                              fusion_heads=heads, fusion_head_dim=head_dim,
                              decoder=build(vocab if text_vocab is None else text_vocab))
    return SpeechGenConfig(**{**kw, **overrides})


def check_width(speech: SpeechGenConfig, llm: LLMConfig) -> None:
    """ValueError unless the generator reads this LLM's hidden width."""
    if speech.llm_hidden != llm.hidden_size:
        raise ValueError(f"SpeechGenConfig.llm_hidden={speech.llm_hidden} but the LLM's "
                         f"hidden_size is {llm.hidden_size}; they must be equal")


def check_compatible(speech: SpeechGenConfig, llm: LLMConfig,
                     tokenizer_vocab: int | None = None) -> None:
    """check_width, and the generator can embed the token ids of the response text: those of
    the tokenizer when given (OpenOmni pairs Qwen2.5-7B's 152064-row table with the 0.5B
    generator's 151936: real token ids stay below 151665), else every id of the LLM's table."""
    check_width(speech, llm)
    need, what = ((tokenizer_vocab, "the tokenizer's vocab_size") if tokenizer_vocab is not None
                  else (llm.vocab_size, "the LLM's vocab_size"))
    if speech.decoder.vocab_size < need:
        raise ValueError(f"SpeechGenConfig.decoder.vocab_size={speech.decoder.vocab_size} is "
                         f"smaller than {what}={need}: the generator embeds the response "
                         f"text with the LLM's token ids")
