"""Speech-unit decoding from the generator: CTC greedy decoding and AR sampling with a KV cache.

`ctc_greedy`: argmax per frame; standard CTC collapses consecutive repeats, then drops blanks
(OpenOmni's evaluation code); `collapse_repeats=False` only drops blanks (their top-level
inference script). `ar_sample`: [sos] fused text [task] prefilled once (`ar_prefill`), then one
unit per step (`ar_step`) in a jitted while_loop with a static `max_units`, each item stopping at
its EOS (= V). Sampling is CosyVoice / VALL-E 2 repetition-aware sampling (RAS): draw from the
top-p / top-k nucleus; if that unit occurs at least ceil(window * tau_r) times among the last
`window` units of the item, redraw from the full distribution. Defaults: SpeechGenConfig
sample_top_p / sample_top_k / repetition_window, tau_r = `repetition_ratio` (CosyVoice 0.1).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.speech.generator import SpeechGenerator, check_shapes, speech_cache


# ---- CTC ----------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("blank", "collapse_repeats"))
def ctc_greedy_padded(log_probs: jax.Array, frame_mask: jax.Array, *, blank: int,
                      collapse_repeats: bool = True) -> tuple[jax.Array, jax.Array]:
    """log_probs [B, T, V + 1], frame_mask [B, T] (right padded) -> (units [B, T] int32, kept
    units first, padded with `blank`; lengths [B] int32)."""
    best = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)  # [B, T]
    valid = frame_mask.astype(bool)
    keep = valid & (best != blank)
    if collapse_repeats:  # a frame equal to the previous frame's argmax (blank or not) goes
        prev = jnp.pad(best, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
        keep = keep & (best != prev)
    order = jnp.argsort(~keep, axis=1, stable=True)  # kept frames first, in order
    units = jnp.take_along_axis(jnp.where(keep, best, blank), order, axis=1)
    return units, keep.sum(axis=1).astype(jnp.int32)


def ctc_greedy(log_probs: Any, frame_mask: Any, *, blank: int | None = None,
               collapse_repeats: bool = True) -> list[np.ndarray]:
    """Greedy CTC decoding -> one int32 unit array per item (blank default: the last index)."""
    shape = tuple(np.shape(log_probs))
    if len(shape) != 3 or shape[-1] < 2:
        raise ValueError(f"ctc_greedy: log_probs must be [batch, frames, units + 1], got {shape}")
    if tuple(np.shape(frame_mask)) != shape[:2]:
        raise ValueError(f"ctc_greedy: frame_mask must have shape {shape[:2]}, got "
                         f"{tuple(np.shape(frame_mask))}")
    blank = shape[-1] - 1 if blank is None else int(blank)
    if not 0 <= blank < shape[-1]:
        raise ValueError(f"ctc_greedy: blank={blank} is outside [0, {shape[-1]})")
    units, lengths = ctc_greedy_padded(jnp.asarray(log_probs), jnp.asarray(frame_mask),
                                       blank=blank, collapse_repeats=bool(collapse_repeats))
    units, lengths = np.asarray(units), np.asarray(lengths)
    return [units[b, :lengths[b]].copy() for b in range(shape[0])]


# ---- AR sampling ---------------------------------------------------------------------------
def _nucleus(logits: jax.Array, top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """Mask [V + 1] logits outside the top-k and the top-p nucleus of those (a unit is kept
    while the mass strictly before it is < top_p; the best one always stays) with -inf."""
    desc = jnp.sort(logits)[::-1]
    in_k = jnp.arange(desc.shape[0]) < top_k
    probs = jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf))
    before = jnp.cumsum(probs) - probs
    cutoff = jnp.min(jnp.where(in_k & (before < top_p), desc, jnp.inf))
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def _ras_pick(logits: jax.Array, history: jax.Array, in_window: jax.Array, key: jax.Array,
              knobs: dict[str, jax.Array]) -> jax.Array:
    """One item: logits [V + 1], its units so far [M] with the window mask [M] -> unit []."""
    scaled = logits.astype(jnp.float32) / knobs["temperature"]
    k_nucleus, k_full = jax.random.split(key)
    cand = jax.random.categorical(k_nucleus, _nucleus(scaled, knobs["top_p"], knobs["top_k"]))
    repeats = jnp.sum((history == cand) & in_window)
    redraw = (knobs["min_repeats"] > 0) & (repeats >= knobs["min_repeats"])
    full = jax.random.categorical(k_full, scaled)
    return jnp.where(redraw, full, cand).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("module", "max_units", "greedy"))
def _ar_sample(module: SpeechGenerator, variables: Any, hidden: jax.Array, row_mask: jax.Array,
               text_ids: jax.Array, text_mask: jax.Array, keys: jax.Array,
               knobs: dict[str, jax.Array], *, max_units: int, greedy: bool
               ) -> tuple[jax.Array, jax.Array]:
    """knobs: top_p, temperature (float32), top_k, window, min_repeats (int32; traced, so
    changing them does not recompile)."""
    c = module.config
    eos = c.unit_vocab
    b = hidden.shape[0]
    cache = speech_cache(c, b, text_ids.shape[1] + 2 + max_units)
    logits, cache, start = module.apply(variables, hidden, row_mask, text_ids, text_mask, cache,
                                        method=SpeechGenerator.ar_prefill)
    slots = jnp.arange(max_units)

    def pick(t, logits, units):
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(keys)
        in_window = (slots < t) & (slots >= t - knobs["window"])  # [M]
        return jax.vmap(lambda lg, h, k: _ras_pick(lg, h, in_window, k, knobs))(
            logits, units, step_keys)

    def emit(t, logits, units, lengths, done):
        unit = pick(t, logits, units)  # [B]
        stop = done | (unit == eos)
        units = units.at[:, t].set(jnp.where(stop, eos, unit))
        return unit, units, lengths + (~stop).astype(jnp.int32), stop

    def cond(state):
        return (state[0] < max_units) & ~jnp.all(state[5])

    def body(state):
        t, unit, cache, units, lengths, done = state
        logits, cache = module.apply(variables, jnp.where(done, eos, unit), start + t - 1,
                                     cache, method=SpeechGenerator.ar_step)
        unit, units, lengths, done = emit(t, logits, units, lengths, done)
        return t + 1, unit, cache, units, lengths, done

    units = jnp.full((b, max_units), eos, jnp.int32)
    unit, units, lengths, done = emit(0, logits, units, jnp.zeros((b,), jnp.int32),
                                      jnp.zeros((b,), bool))
    state = (jnp.ones((), jnp.int32), unit, cache, units, lengths, done)
    _, _, _, units, lengths, _ = jax.lax.while_loop(cond, body, state)
    return units, lengths


def _item_keys(rng: Any, batch: int) -> jax.Array:
    """One key per item: a single key -> fold_in(rng, i); a [batch] key array as is."""
    if not jnp.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(jnp.asarray(rng, jnp.uint32))
    if rng.ndim == 0:
        return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch))
    if rng.shape != (batch,):
        raise ValueError(f"ar_sample: rng must be one key or [batch={batch}] keys, got "
                         f"shape {rng.shape}")
    return rng


def ar_sample(module: SpeechGenerator, variables: Any, hidden: Any, row_mask: Any,
              text_ids: Any, text_mask: Any, *, rng: Any = None, max_units: int,
              top_p: float | None = None, top_k: int | None = None, window: int | None = None,
              tau_r: float | None = None, temperature: float = 1.0, greedy: bool = False
              ) -> tuple[np.ndarray, np.ndarray]:
    """AR decoding of a batch -> (units [B, max_units] int32, EOS-padded; lengths [B] int32).

    rng: one key (item i uses fold_in(rng, i), so an item's draws do not depend on the batch)
    or [B] keys. greedy: argmax (no sampling, rng unused). Sampling defaults: the config's
    sample_top_p / sample_top_k / repetition_window (0: plain nucleus sampling) and tau_r.
    """
    c = module.config if isinstance(module, SpeechGenerator) else None
    if c is None or c.mode != "ar":
        raise ValueError(f"ar_sample needs an AR SpeechGenerator (SpeechGenConfig.mode='ar'), "
                         f"got {'mode ' + repr(c.mode) if c else type(module).__name__}")
    check_shapes(c, hidden, row_mask, text_ids, text_mask)
    if row_mask is None or text_mask is None:
        raise ValueError("ar_sample: give row_mask [B, R] and text_mask [B, S]")
    if not isinstance(max_units, int | np.integer) or max_units <= 0:
        raise ValueError(f"ar_sample: max_units must be a positive int, got {max_units!r}")
    top_p = c.sample_top_p if top_p is None else top_p
    top_k = c.sample_top_k if top_k is None else top_k
    window = c.repetition_window if window is None else window
    tau_r = c.repetition_ratio if tau_r is None else tau_r
    if not 0 < top_p <= 1:
        raise ValueError(f"ar_sample: top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(top_k, int | np.integer) or top_k < 1:
        raise ValueError(f"ar_sample: top_k must be an int >= 1, got {top_k!r}")
    if not isinstance(window, int | np.integer) or window < 0:
        raise ValueError(f"ar_sample: window must be an int >= 0 (0: no RAS), got {window!r}")
    if not 0 < tau_r <= 1:
        raise ValueError(f"ar_sample: tau_r (repetition ratio) must be in (0, 1], got {tau_r!r}")
    if not temperature > 0:
        raise ValueError(f"ar_sample: temperature must be > 0, got {temperature!r}")
    need = np.shape(text_ids)[1] + 2 + max_units
    if need > c.decoder.max_position_embeddings:
        raise ValueError(f"ar_sample: text {np.shape(text_ids)[1]} + 2 + max_units {max_units} "
                         f"exceeds decoder.max_position_embeddings "
                         f"{c.decoder.max_position_embeddings}")
    if rng is None and not greedy:
        raise ValueError("ar_sample: sampling (greedy=False) needs an rng key")
    b = np.shape(hidden)[0]
    keys = _item_keys(jax.random.key(0) if rng is None else rng, b)
    min_repeats = math.ceil(window * tau_r - 1e-9) if window else 0
    knobs = {"top_p": jnp.float32(top_p), "temperature": jnp.float32(temperature),
             "top_k": jnp.int32(min(top_k, c.num_outputs)), "window": jnp.int32(window),
             "min_repeats": jnp.int32(min_repeats)}
    units, lengths = _ar_sample(
        module, variables, jnp.asarray(hidden), jnp.asarray(row_mask, bool),
        jnp.asarray(text_ids, jnp.int32), jnp.asarray(text_mask, bool), keys, knobs,
        max_units=int(max_units), greedy=bool(greedy))
    return np.asarray(units), np.asarray(lengths)
