"""OpenOmni's speech generator: LLM hidden states + response text -> speech-unit logits.

Framing [sos, assistant rows..., task] -> expansion (soft MoE / sparse MoE / MLP) to
`expansion` sub-tokens per row (interleaved channels) -> text-guided fusion (the response
tokens' embeddings cross-attend to them) -> either CTC (repeat each fused token `upsample`
times, stretched to the targets in training; optionally + a learned embedding of each frame's
place in its token's segment, `segment_positions`; Qwen2 decoder; blank = V) or AR (Qwen2
decoder on [sos] fused text [task] units; next unit, EOS = V). Batched with per-item lengths,
static shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.layers.attention import init_cache
from omni_jax.layers.common import constrain, logical_init, parse_dtype
from omni_jax.layers.mlp import GeluMLP
from omni_jax.layers.moe import SoftMoE
from omni_jax.llm.decoder import Decoder
from omni_jax.speech.config import SpeechGenConfig
from omni_jax.speech.fusion import TextFusion

_ACT = ("act_batch", "act_len", "act_embed")


def compact_rows(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Move each item's masked rows to the front, in order: x [b, r, d], mask [b, r] ->
    (rows [b, r, d], counts [b]); rows past the count are arbitrary."""
    order = jnp.argsort(~mask, axis=1, stable=True)  # valid rows first, original order kept
    return jnp.take_along_axis(x, order[..., None], axis=1), mask.sum(axis=1).astype(jnp.int32)


def stretch_index(src_len: jax.Array, up_len: jax.Array, length: int) -> tuple[jax.Array,
                                                                               jax.Array]:
    """Frame t < up_len takes token floor(float32(t) / float32(up_len / src_len)) (the released
    code's float32 division, which differs from integer floor at some stretched boundaries).

    src_len, up_len [b] int -> (index [b, length] int32, frame mask [b, length] bool).
    """
    ratio = up_len.astype(jnp.float32) / jnp.maximum(src_len, 1).astype(jnp.float32)
    ratio = jnp.where(src_len > 0, ratio, 1.0)
    t = jnp.arange(length, dtype=jnp.float32)
    idx = jnp.floor(t[None] / ratio[:, None]).astype(jnp.int32)
    idx = jnp.clip(idx, 0, jnp.maximum(src_len - 1, 0)[:, None])
    mask = jnp.arange(length)[None] < up_len[:, None]
    return jnp.where(mask, idx, 0), mask


def segment_bins(idx: jax.Array, frame_mask: jax.Array, num_tokens: int, bins: int
                 ) -> jax.Array:
    """Each frame's place in its token's segment: floor(bins * offset / segment length), in
    [0, bins) (the offset itself when a segment has `bins` frames); 0 on masked frames.

    idx [b, t] (token of each frame, non-decreasing), frame_mask [b, t] -> [b, t] int32.
    """
    t = idx.shape[1]
    pos = jnp.arange(t, dtype=jnp.int32)

    def one(i, m):
        start = jnp.full((num_tokens,), t, jnp.int32).at[i].min(jnp.where(m, pos, t))
        count = jnp.zeros((num_tokens,), jnp.int32).at[i].add(m.astype(jnp.int32))
        return (pos - start[i]) * bins // jnp.maximum(count[i], 1)

    out = jax.vmap(one)(idx, frame_mask)
    return jnp.where(frame_mask, jnp.clip(out, 0, bins - 1), 0).astype(jnp.int32)


def _select(conds: list[jax.Array], choices: list[jax.Array]) -> jax.Array:
    """First true condition [b, l] picks its choice ([b, l, d] or [d]); zero otherwise."""
    out = jnp.zeros(jnp.broadcast_shapes(*(c.shape for c in choices), conds[0].shape + (1,)),
                    choices[0].dtype)
    for cond, choice in zip(conds[::-1], choices[::-1]):
        out = jnp.where(cond[..., None], choice, out)
    return out


def _need_ar(config: SpeechGenConfig, method: str) -> None:
    if config.mode != "ar":
        raise ValueError(f"SpeechGenerator.{method} needs SpeechGenConfig.mode='ar' (got "
                         f"{config.mode!r}): only AR generators own unit embeddings")


def _lengths(mask: jax.Array | None, like: jax.Array) -> jax.Array:
    if mask is None:
        return jnp.full(like.shape[:1], like.shape[1], jnp.int32)
    return mask.sum(axis=1).astype(jnp.int32)


def check_shapes(config: SpeechGenConfig, hidden: Any, row_mask: Any, text_ids: Any,
                 text_mask: Any, units: Any = None, unit_mask: Any = None) -> None:
    """Static checks (shapes only; fine under jit): ValueError naming the mismatch."""
    hs = tuple(np.shape(hidden))
    if len(hs) != 3 or hs[-1] != config.llm_hidden:
        raise ValueError(f"SpeechGenerator: hidden must be [batch, rows, llm_hidden="
                         f"{config.llm_hidden}] (SpeechGenConfig.llm_hidden), got {hs}")
    b, r = hs[:2]
    want = {"row_mask": ((b, r), row_mask), "text_mask": (np.shape(text_ids), text_mask)}
    if units is not None:
        want["unit_mask"] = (np.shape(units), unit_mask)
    if len(np.shape(text_ids)) != 2 or np.shape(text_ids)[0] != b:
        raise ValueError(f"SpeechGenerator: text_ids must be [batch={b}, seq], got "
                         f"{np.shape(text_ids)}")
    if units is not None and (len(np.shape(units)) != 2 or np.shape(units)[0] != b):
        raise ValueError(f"SpeechGenerator: units must be [batch={b}, units], got "
                         f"{np.shape(units)}")
    for name, (shape, value) in want.items():
        if value is not None and tuple(np.shape(value)) != tuple(shape):
            raise ValueError(f"SpeechGenerator: {name} must have shape {tuple(shape)}, got "
                             f"{tuple(np.shape(value))}")


def _check_prefix(name: str, mask: np.ndarray) -> None:
    n = mask.sum(axis=1)
    if (mask != (np.arange(mask.shape[1])[None] < n[:, None])).any():
        raise ValueError(f"check_speech_batch: {name} must be right padded (valid entries "
                         f"first, then padding) in every item")


def check_speech_batch(config: SpeechGenConfig, batch: Mapping[str, Any]) -> None:
    """Host-side value checks before compute. `batch` holds hidden, row_mask, text_ids,
    text_mask and optionally units, unit_mask (the SpeechGenerator call's arguments)."""
    get = lambda k: None if batch.get(k) is None else np.asarray(batch[k])  # noqa: E731
    hidden, row_mask, text_ids, text_mask = (get(k) for k in
                                             ("hidden", "row_mask", "text_ids", "text_mask"))
    units, unit_mask = get("units"), get("unit_mask")
    for k, v in (("hidden", hidden), ("row_mask", row_mask), ("text_ids", text_ids),
                 ("text_mask", text_mask)):
        if v is None:
            raise ValueError(f"check_speech_batch: missing {k!r}")
    check_shapes(config, hidden, row_mask, text_ids, text_mask, units, unit_mask)
    text_mask, row_mask = text_mask.astype(bool), row_mask.astype(bool)
    _check_prefix("text_mask", text_mask)
    tv = config.decoder.vocab_size
    if ((text_ids < 0) | (text_ids >= tv))[text_mask].any():
        raise ValueError(f"check_speech_batch: text_ids must be in [0, decoder.vocab_size={tv})")
    s_len = text_mask.sum(axis=1)
    if ((s_len > 0) & (row_mask.sum(axis=1) == 0)).any():
        bad = np.flatnonzero((s_len > 0) & (row_mask.sum(axis=1) == 0)).tolist()
        raise ValueError(f"check_speech_batch: items {bad} have response text but no hidden "
                         f"rows (row_mask is empty)")
    if units is None:
        return
    unit_mask = np.ones(units.shape, bool) if unit_mask is None else unit_mask.astype(bool)
    _check_prefix("unit_mask", unit_mask)
    v = config.unit_vocab
    if ((units < 0) | (units >= v))[unit_mask].any():
        bad = units[unit_mask][(units[unit_mask] < 0) | (units[unit_mask] >= v)]
        raise ValueError(f"check_speech_batch: units must be in [0, unit_vocab={v}) (index "
                         f"{v} is the blank/EOS), got e.g. {int(bad[0])}")
    empty = np.flatnonzero((unit_mask.sum(axis=1) > 0) & (s_len == 0)).tolist()
    if empty:
        raise ValueError(f"check_speech_batch: items {empty} have target units but empty "
                         f"response text (text_mask has no valid token)")


def speech_cache(config: SpeechGenConfig, batch: int, max_len: int) -> dict[str, jax.Array]:
    """An empty KV cache for the generator's decoder (AR decoding)."""
    d = config.decoder
    return init_cache(batch, max_len, d.num_kv_heads, d.head_dim, d.num_layers,
                      parse_dtype(d.dtype))


class SparseExpansion(nn.Module):
    """Dense(H -> features) then a sparse top-k MoE on `features` (layers.moe.SparseMoE, which
    maps a width to itself) -> (y, aux losses)."""

    config: SpeechGenConfig
    features: int

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        from omni_jax.layers import moe as moe_lib  # optional part: imported when used

        if not hasattr(moe_lib, "SparseMoE"):
            raise ValueError("SpeechGenConfig.moe='sparse' needs omni_jax.layers.moe.SparseMoE, "
                             "which this build lacks; use moe='soft' or 'mlp'")
        d = self.config.decoder
        dt, pdt = parse_dtype(d.dtype), parse_dtype(d.param_dtype)
        init = nn.initializers.normal(d.initializer_range)
        h = nn.Dense(self.features, dtype=dt, param_dtype=pdt, name="proj",
                     kernel_init=logical_init(init, ("embed", "mlp")),
                     bias_init=logical_init(nn.initializers.zeros, ("mlp",)))(x)
        return moe_lib.SparseMoE(self.config.moe_config(), name="moe")(h, mask)


class SpeechGenerator(nn.Module):
    """hidden [b, rows, H] + row_mask + response text_ids/text_mask (+ units) -> speech logits.

    `__call__` runs the configured mode (`ctc` or `ar`); `fuse`, `ctc`, `ar`, `ar_prefill`,
    `ar_step` are the parts (pass method= to apply).
    """

    config: SpeechGenConfig

    def setup(self) -> None:
        c, d = self.config, self.config.decoder
        dt, pdt, std = parse_dtype(d.dtype), parse_dtype(d.param_dtype), d.initializer_range
        emb = lambda n, w, names: nn.Embed(n, w, dtype=dt, param_dtype=pdt,  # noqa: E731
                                           embedding_init=logical_init(
                                               nn.initializers.normal(std), names))
        self.llm_embedding = emb(2, c.llm_hidden, (None, "embed"))  # [sos, task] rows
        features = c.expansion * c.width
        if c.moe == "soft":
            self.input_proj = SoftMoE(c.num_experts, c.expert_hidden, features, "relu", std,
                                      dt, pdt)
        elif c.moe == "mlp":
            self.input_proj = GeluMLP(c.expert_hidden, "relu", std, dt, pdt, features)
        else:
            self.input_proj = SparseExpansion(c, features)
        self.fusion = TextFusion(c.fusion_layers, c.fusion_heads, c.fusion_head_dim,
                                 c.fusion_ff_mult, c.norm_eps, std, dt, pdt)
        self.llm = Decoder(d)
        self.llm_decoder = nn.Dense(
            c.num_outputs, dtype=dt, param_dtype=pdt,
            kernel_init=logical_init(nn.initializers.normal(std), ("embed", "vocab")),
            bias_init=logical_init(nn.initializers.zeros, ("vocab",)))
        if c.segment_positions:  # [upsample, N]: a frame's place in its token's segment
            self.segment_pos = emb(c.upsample, c.width, (None, "embed"))
        if c.mode == "ar":
            self.ar_embedding = emb(2, c.width, (None, "embed"))  # [sos, task] in width N
            self.unit_embedding = emb(c.num_outputs, c.width, ("vocab", "embed"))

    @property
    def compute_dtype(self) -> Any:
        return parse_dtype(self.config.decoder.dtype)

    def __call__(self, hidden: jax.Array, row_mask: jax.Array, text_ids: jax.Array,
                 text_mask: jax.Array, units: jax.Array | None = None,
                 unit_mask: jax.Array | None = None) -> dict[str, jax.Array]:
        run = self.ctc if self.config.mode == "ctc" else self.ar
        return run(hidden, row_mask, text_ids, text_mask, units, unit_mask)

    def _keys(self, hidden: jax.Array, row_mask: jax.Array):
        """[sos, rows, task] -> expansion -> interleaved split: keys [b, e (r + 2), N]."""
        c = self.config
        rows, n = compact_rows(hidden, row_mask.astype(bool))  # [b, r, H], [b]
        b, r, _ = rows.shape
        pos = jnp.arange(r + 2)[None]  # [1, r + 2]
        sos_task = self.llm_embedding(jnp.arange(2)).astype(rows.dtype)  # [2, H]
        at = jnp.take_along_axis(rows, jnp.clip(pos - 1, 0, r - 1)[..., None], axis=1)
        nb = n[:, None]
        x = _select([pos == 0, pos <= nb, pos == nb + 1], [sos_task[0], at, sos_task[1]])
        x = constrain(x.astype(self.compute_dtype), _ACT)  # [b, r + 2, H]
        aux = None
        if c.moe == "sparse":
            y, aux = self.input_proj(x, pos < n[:, None] + 2)
        else:
            y = self.input_proj(x)
        if y.shape[-1] != c.expansion * c.width:
            raise ValueError(f"SpeechGenerator: expansion output width {y.shape[-1]} != "
                             f"expansion * N = {c.expansion * c.width}")
        # b n (d1 d2) -> b (n d2) d1: sub-token j takes channels j, j + e, j + 2e, ...
        keys = y.reshape(b, r + 2, c.width, c.expansion).transpose(0, 1, 3, 2)
        keys = keys.reshape(b, (r + 2) * c.expansion, c.width)
        key_mask = jnp.arange(keys.shape[1])[None] < (c.expansion * (n + 2))[:, None]
        return constrain(keys, _ACT), key_mask, aux

    def _fuse(self, hidden, row_mask, text_ids):
        keys, key_mask, aux = self._keys(hidden, row_mask)
        queries = self.llm.embed_tokens(text_ids)  # [b, s, N]
        return constrain(self.fusion(queries, keys, key_mask), _ACT), aux

    def fuse(self, hidden: jax.Array, row_mask: jax.Array, text_ids: jax.Array) -> jax.Array:
        """Fused text [b, s, N]; rows past an item's text length are unused padding."""
        check_shapes(self.config, hidden, row_mask, text_ids, None)
        return self._fuse(hidden, row_mask, text_ids)[0]

    def _head(self, h: jax.Array) -> jax.Array:
        return self.llm_decoder(h).astype(jnp.float32)  # [..., V + 1]

    def ctc(self, hidden: jax.Array, row_mask: jax.Array, text_ids: jax.Array,
            text_mask: jax.Array, units: jax.Array | None = None,
            unit_mask: jax.Array | None = None) -> dict[str, jax.Array]:
        """CTC log-probs over T = max(upsample * s, u) frames (u = 0 without targets)."""
        c = self.config
        check_shapes(c, hidden, row_mask, text_ids, text_mask, units, unit_mask)
        fused, aux = self._fuse(hidden, row_mask, text_ids)
        s_len = _lengths(text_mask, text_ids)
        up = c.upsample * s_len
        length = c.upsample * text_ids.shape[1]
        if units is not None:
            up = jnp.maximum(up, _lengths(unit_mask, units))
            length = max(length, units.shape[1])
        idx, frame_mask = stretch_index(s_len, up, length)
        x = jnp.take_along_axis(fused, idx[..., None], axis=1)
        if c.segment_positions:
            bins = segment_bins(idx, frame_mask, text_ids.shape[1], c.upsample)
            x = x + self.segment_pos(bins).astype(x.dtype)
        x = jnp.where(frame_mask[..., None], x, 0)  # [b, t, N]
        h = self.llm(inputs_embeds=x, segment_ids=frame_mask.astype(jnp.int32),
                     compute_logits=False)["hidden"]
        out = {"speech_log_probs": jax.nn.log_softmax(self._head(h), axis=-1),
               "speech_frame_mask": frame_mask, "speech_frames": up.astype(jnp.int32)}
        if aux is not None:
            out["moe_aux"] = aux
        return out

    def _ar_inputs(self, fused, s_len, units, u_len):
        """Pack [sos] fused[:s] [task] unit_emb(units[:u]) per item, right padded."""
        s, u = fused.shape[1], units.shape[1]
        pos = jnp.arange(s + 2 + u)[None]  # [1, l]
        sl, ul = s_len[:, None], u_len[:, None]
        sos_task = self.ar_embedding(jnp.arange(2)).astype(fused.dtype)  # [2, N]
        text = jnp.take_along_axis(fused, jnp.clip(pos - 1, 0, s - 1)[..., None], axis=1)
        ue = self.unit_embedding(jnp.clip(units, 0, self.config.unit_vocab))  # [b, u, N]
        ue = jnp.pad(ue, ((0, 0), (0, 1), (0, 0)))  # a zero row: gathers work for u = 0
        ue = jnp.take_along_axis(ue, jnp.clip(pos - sl - 2, 0, u)[..., None], axis=1)
        valid = pos < sl + 2 + ul
        x = _select([pos == 0, pos <= sl, pos == sl + 1, valid], [sos_task[0], text,
                                                                  sos_task[1], ue])
        return constrain(x.astype(self.compute_dtype), _ACT), valid

    def ar(self, hidden: jax.Array, row_mask: jax.Array, text_ids: jax.Array,
           text_mask: jax.Array, units: jax.Array | None = None,
           unit_mask: jax.Array | None = None) -> dict[str, jax.Array]:
        """Teacher-forced next-unit logits: [task] predicts u_1, ..., u_last predicts EOS = V."""
        c = self.config
        _need_ar(c, "ar")
        check_shapes(c, hidden, row_mask, text_ids, text_mask, units, unit_mask)
        if units is None:
            units = jnp.zeros((text_ids.shape[0], 0), jnp.int32)
        fused, aux = self._fuse(hidden, row_mask, text_ids)
        s_len, u_len = _lengths(text_mask, text_ids), _lengths(unit_mask, units)
        x, valid = self._ar_inputs(fused, s_len, units, u_len)
        h = self.llm(inputs_embeds=x, segment_ids=valid.astype(jnp.int32),
                     compute_logits=False)["hidden"]
        k = jnp.arange(x.shape[1])[None] - (s_len + 1)[:, None]  # target slot per position
        padded = jnp.pad(units.astype(jnp.int32), ((0, 0), (0, 1)))
        nxt = jnp.take_along_axis(padded, jnp.clip(k, 0, units.shape[1]), axis=1)
        targets = jnp.where(k < u_len[:, None], nxt, c.unit_vocab)  # EOS after the last unit
        mask = (k >= 0) & (k <= u_len[:, None]) & (s_len > 0)[:, None]
        out = {"speech_ar_logits": self._head(h), "speech_ar_targets": jnp.where(mask, targets, 0),
               "speech_ar_mask": mask}
        if aux is not None:
            out["moe_aux"] = aux
        return out

    def ar_prefill(self, hidden: jax.Array, row_mask: jax.Array, text_ids: jax.Array,
                   text_mask: jax.Array, cache: dict[str, jax.Array]
                   ) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
        """Run [sos] fused [task] into a fresh cache (speech_cache) -> (logits of u_1
        [b, V + 1], cache, lengths [b] = s + 2: the position of the first unit)."""
        _need_ar(self.config, "ar_prefill")
        check_shapes(self.config, hidden, row_mask, text_ids, text_mask)
        fused, _ = self._fuse(hidden, row_mask, text_ids)
        s_len = _lengths(text_mask, text_ids)
        units = jnp.zeros((text_ids.shape[0], 0), jnp.int32)
        x, valid = self._ar_inputs(fused, s_len, units, jnp.zeros_like(s_len))
        out = self.llm(inputs_embeds=x, segment_ids=valid.astype(jnp.int32), cache=cache,
                       compute_logits=False)
        last = jnp.take_along_axis(out["hidden"], (s_len + 1)[:, None, None], axis=1)[:, 0]
        return self._head(last), out["cache"], s_len + 2

    def ar_step(self, unit_ids: jax.Array, positions: jax.Array, cache: dict[str, jax.Array]
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """One unit per item: unit_ids [b] at RoPE positions [b] -> (next logits [b, V + 1],
        cache). Positions continue from ar_prefill's lengths."""
        _need_ar(self.config, "ar_step")
        x = self.unit_embedding(unit_ids)[:, None].astype(self.compute_dtype)  # [b, 1, N]
        ones = jnp.ones(x.shape[:2], jnp.int32)
        out = self.llm(inputs_embeds=x, positions=positions[:, None].astype(jnp.int32),
                       segment_ids=ones, cache=cache, compute_logits=False)
        return self._head(out["hidden"][:, 0]), out["cache"]
