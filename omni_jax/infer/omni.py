"""Generation from the omni model: media in the prompt, text out.

One jitted prefill runs OmniModel over the whole spliced prompt (every media item encoded once)
and fills the LLM's KV cache; one jitted decode loop then feeds back text tokens only
({"input_ids": [batch, 1], "modality": 0}: no media key, so no tower runs). Rows may be left-
or right-padded: `segment_ids` (1 = token, 0 = pad) is the attention mask, positions come from
it (cumsum - 1, as infer.generate), and each row behaves as if generated alone.
`stream_omni` yields the same tokens step by step (a Python loop over one jitted step) for
sentence-wise streaming (infer.stream). Prompts come from `prompt_from_record`: OmniEncoder
(media features) + ChatTemplate with the generation prompt.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.infer.generate import SamplingConfig, sample_logits
from omni_jax.layers.attention import init_cache
from omni_jax.layers.common import parse_dtype
from omni_jax.model import MEDIA_KEYS, MODALITY_CODE, OmniModel, check_batch
from omni_jax.omni_config import MODALITIES

PROMPT_KEYS = ("input_ids", "modality", "media_index", "segment_ids", "positions", *MEDIA_KEYS)
_RECORD_MEDIA = {"image": "images", "video": "videos", "audio": "audios"}
GREEDY = SamplingConfig()  # the default: argmax decoding
EosIds = tuple[int, ...] | None  # the compiled pieces' static EOS ids


# ---- prompts ------------------------------------------------------------------------------
def user_record(text: str, *, images: Sequence[Any] = (), videos: Sequence[Any] = (),
                audios: Sequence[Any] = (), system: str | None = None) -> dict[str, Any]:
    """One user turn as an omni record: media parts (images, videos, audios, in that order)
    before the text; refs are paths or bytes (data.sources.read_media)."""
    media = {"image": list(images), "video": list(videos), "audio": list(audios)}
    parts = [{"type": m} for m in MODALITIES for _ in media[m]]
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": [*parts, {"type": "text", "text": text}]})
    return {"messages": messages, **{_RECORD_MEDIA[m]: v for m, v in media.items() if v}}


def ola_user_record(question: str | None = None, *, images: Sequence[Any] = (),
                    speech: Sequence[Any] = (), videos: Sequence[Any] = (),
                    system: str = "You are a helpful assistant.") -> dict[str, Any]:
    """A user turn laid out as Ola's inference code writes it (SEEDS): `<image>\n{q}`,
    `<speech>\n{q}`, and for an image with a spoken question `<image>\nUser's question in
    speech: <speech>\n`; placeholders are filled in text order (Ola's code fills images first,
    then speech, whatever the order: the same here because images come first)."""
    if not images and not speech and not videos and not question:
        raise ValueError("ola_user_record: give a question, media or both")
    if speech and images and question:
        raise ValueError("ola_user_record: with an image and a spoken question the question is "
                         "the speech; give question=None")
    visual = [{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos]
    audio = [{"type": "audio"} for _ in speech]
    if visual and audio:  # image (or video) + spoken question
        parts = [*visual, {"type": "text", "text": "\nUser's question in speech: "}, *audio,
                 {"type": "text", "text": "\n"}]
    else:
        parts = [*(visual or audio), {"type": "text", "text": "\n" + (question or "")}]
    media = {"images": list(images), "videos": list(videos), "audios": list(speech)}
    return {"messages": [{"role": "system", "content": system},
                         {"role": "user", "content": parts}],
            **{k: v for k, v in media.items() if v}}


def prompt_from_record(encoder: Any, record: Mapping[str, Any],
                       media: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Omni record ending in a user turn -> a batch of one prompt: input_ids / modality
    [1, seq] (ChatTemplate with add_generation_prompt=True, placeholders expanded to the
    towers' token counts) plus the media arrays of `encoder` (a data.omni.OmniEncoder), or
    `media`: the record's items already decoded (encoder.media(record))."""
    messages = record.get("messages") if isinstance(record, Mapping) else None
    if not messages or not isinstance(messages[-1], Mapping) \
            or messages[-1].get("role") != "user":
        raise ValueError("prompt_from_record: record['messages'] must be a non-empty list "
                         "ending with a user turn (the model answers it)")
    from omni_jax.data.omni import VIDEO_FRAMES
    from omni_jax.data.packing import media_index

    media = encoder.media(record) if media is None else dict(media)
    if hasattr(encoder, "token_counts"):  # a short_clips="drop" clip: its own frames' tokens
        counts = encoder.token_counts(media)
    else:
        counts = {m: [encoder.counts[m]] * len(v) for m, v in media.items() if m in MODALITIES}
    dropped = media.pop(VIDEO_FRAMES, None) is not None
    if hasattr(encoder, "messages"):  # a tiling image tower: one placeholder per view
        messages = encoder.messages({**record, "messages": messages})
    ex = encoder.template.encode(messages, media_token_counts=counts, add_generation_prompt=True)
    out = {"input_ids": ex.input_ids[None], "modality": ex.modality[None], **media}
    if dropped:  # clips of a variable number of tokens: each placeholder's embedding row
        out["media_index"] = media_index(ex.to_dict(), {}, encoder.counts)[None]
    return out


def prompt_from_conversation(encoder: Any, conversation: Sequence[Mapping[str, Any]],
                             media: Mapping[str, Sequence[Any]] | None = None
                             ) -> dict[str, np.ndarray]:
    """`prompt_from_record` for a conversation plus media refs {"image": [...], ...}."""
    media = dict(media or {})
    unknown = sorted(set(media) - set(MODALITIES))
    if unknown:
        raise ValueError(f"prompt_from_conversation: unknown media keys {unknown}; expected "
                         f"{MODALITIES}")
    return prompt_from_record(encoder, {"messages": list(conversation),
                                        **{_RECORD_MEDIA[m]: list(v) for m, v in media.items()}})


def collate_prompts(prompts: Sequence[Mapping[str, np.ndarray]], pad_id: int,
                    tokens: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Batches of one prompt -> one left-padded batch (segment_ids marks tokens), media
    arrays concatenated in row order (the order their placeholders appear). Prompts with a
    media_index (a short_clips="drop" clip, prompt_from_record) need `tokens`, the embeddings
    per item of each modality (OmniEncoder.counts): the batch then gets a media_index too."""
    if not prompts:
        raise ValueError("collate_prompts: expected at least one prompt")
    indexed = any(p.get("media_index") is not None for p in prompts)
    width = max(p["input_ids"].shape[1] for p in prompts)
    out: dict[str, Any] = {"input_ids": [], "modality": [], "segment_ids": []}
    if indexed:
        out["media_index"] = _media_rows(prompts, tokens, width)
    for p in prompts:
        n = p["input_ids"].shape[1]
        pad = ((0, 0), (width - n, 0))
        out["input_ids"].append(np.pad(p["input_ids"], pad, constant_values=pad_id))
        out["modality"].append(np.pad(p["modality"], pad))
        out["segment_ids"].append(np.pad(np.ones((1, n), np.int32), pad))
    batch = {k: np.concatenate(v).astype(np.int32) for k, v in out.items()}
    for key in MEDIA_KEYS:
        items = [p[key] for p in prompts if p.get(key) is not None]
        if items:
            batch[key] = np.concatenate(items)
    return batch


def _media_rows(prompts: Sequence[Mapping[str, np.ndarray]], tokens: Mapping[str, int] | None,
                width: int) -> list[np.ndarray]:
    """Each prompt's media_index [1, width] (left-padded with -1) in the collated batch: its own
    rows (a prompt without one: its k-th placeholder of a modality takes row k) offset by the
    items of the rows before it."""
    used = [m for m in MODALITIES if any(p.get(m) is not None for p in prompts)]
    missing = [m for m in used if not tokens or m not in tokens]
    if missing:
        raise ValueError(f"collate_prompts: prompts with a media_index need tokens per item of "
                         f"{missing} (OmniEncoder.counts)")
    first = dict.fromkeys(used, 0)
    rows = []
    for p in prompts:
        modality = np.asarray(p["modality"])
        own = p.get("media_index")
        if own is None:
            own = np.full(modality.shape, -1, np.int64)
            for m in used:
                is_m = modality == MODALITY_CODE[m]
                own[is_m] = np.arange(int(is_m.sum()))
        own = np.asarray(own).copy()
        for m in used:
            is_m = modality == MODALITY_CODE[m]
            own[is_m] += first[m] * int(tokens[m])
            first[m] += 0 if p.get(m) is None else len(p[m])
        rows.append(np.pad(own, ((0, 0), (width - own.shape[1], 0)), constant_values=-1))
    return rows


# ---- validation ---------------------------------------------------------------------------
def _prepare(model: OmniModel, variables: Any, batch: Mapping[str, Any],
             max_new_tokens: int | None, eos_id: int | Sequence[int] | None, pad_id: int,
             sampling: SamplingConfig, rng: Any, max_len: int | None,
             vocab_limit: int | None) -> tuple[dict[str, Any], int, int, EosIds]:
    """Check every argument before compute -> (device batch with segment_ids/positions,
    max_new_tokens, max_len, EOS ids as a tuple or None)."""
    if not isinstance(model, OmniModel):
        raise ValueError(f"generate_omni: model must be an OmniModel, got {type(model).__name__}")
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("generate_omni: variables must be a mapping {'params': ...} (as "
                         "model.init returns)")
    if not isinstance(sampling, SamplingConfig):
        raise ValueError(f"generate_omni: sampling must be a SamplingConfig, got "
                         f"{type(sampling).__name__}")
    if not sampling.greedy and rng is None:
        raise ValueError("generate_omni: sampling (greedy=False) needs an rng key")
    if "input_ids" not in batch:
        raise ValueError(f"generate_omni: batch needs 'input_ids'; keys: {sorted(batch)}")
    unknown = sorted(set(batch) - set(PROMPT_KEYS) - {"loss_mask", "item_index"})
    if unknown:
        raise ValueError(f"generate_omni: unknown batch keys {unknown}; expected a subset of "
                         f"{list(PROMPT_KEYS)}")
    ids = np.asarray(batch["input_ids"])
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.shape[1] == 0:
        raise ValueError(f"generate_omni: input_ids must be a non-empty integer array "
                         f"[batch, prompt_len], got shape {ids.shape} dtype {ids.dtype}")
    if batch.get("modality") is None and any(batch.get(m) is not None for m in MODALITIES):
        raise ValueError("generate_omni: batch has media arrays but no 'modality' [batch, seq] "
                         "marking their placeholder positions")
    check_batch(model.config, batch)  # media shapes, towers present, placeholder counts
    cfg = model.config.llm
    mask = np.ones_like(ids, np.int32) if batch.get("segment_ids") is None else np.asarray(
        batch["segment_ids"])
    if mask.shape != ids.shape or not np.isin(mask, (0, 1)).all():
        raise ValueError(f"generate_omni: segment_ids must be a 0/1 mask (1 = token, 0 = pad) "
                         f"of shape {ids.shape}: one sequence per row (no packing)")
    if not mask.any(axis=1).all():
        raise ValueError(f"generate_omni: rows {np.nonzero(~mask.any(axis=1))[0].tolist()} "
                         "have no tokens (segment_ids all 0)")
    if max_new_tokens is None and eos_id is None:
        raise ValueError("generate_omni: give max_new_tokens or eos_id (or both): without "
                         "either, generation has no stopping rule")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int)
                                       or max_new_tokens <= 0):
        raise ValueError(f"generate_omni: max_new_tokens must be a positive int or None, got "
                         f"{max_new_tokens!r}")
    eos = None if eos_id is None else tuple(
        [eos_id] if isinstance(eos_id, int | np.integer) else eos_id)
    for name, tid in [("eos_id", t) for t in eos or ()] + [("pad_id", pad_id)]:
        if not isinstance(tid, int | np.integer) or not 0 <= tid < cfg.vocab_size:
            raise ValueError(f"generate_omni: {name}={tid!r} is outside the vocabulary "
                             f"[0, {cfg.vocab_size})")
    if eos == ():
        raise ValueError("generate_omni: eos_id is an empty sequence; give ids or None")
    if vocab_limit is not None and (not isinstance(vocab_limit, int)
                                    or not 0 < vocab_limit <= cfg.vocab_size):
        raise ValueError(f"generate_omni: vocab_limit must be an int in [1, {cfg.vocab_size}] "
                         f"(the LLM vocab_size), got {vocab_limit!r}")
    prompt = ids.shape[1]
    limit = cfg.max_position_embeddings
    if max_len is None:
        max_len = prompt + max_new_tokens if max_new_tokens is not None else limit
    need = prompt + (max_new_tokens or 1)
    if not isinstance(max_len, int) or max_len < need:
        raise ValueError(f"generate_omni: max_len={max_len!r} is too small: the cache must hold "
                         f"prompt_len {prompt} + max_new_tokens {max_new_tokens or 1} = {need}")
    if max_len > limit:
        raise ValueError(f"generate_omni: max_len {max_len} (prompt_len {prompt} + new tokens) "
                         f"exceeds max_position_embeddings {limit}")
    max_new_tokens = max_new_tokens or max_len - prompt
    dev = {k: jnp.asarray(v) for k, v in batch.items()
           if k in PROMPT_KEYS and v is not None}
    dev["input_ids"] = dev["input_ids"].astype(jnp.int32)
    dev["modality"] = (jnp.zeros_like(dev["input_ids"]) if batch.get("modality") is None
                       else dev["modality"].astype(jnp.int32))
    dev["segment_ids"] = jnp.asarray(mask, jnp.int32)
    if dev.get("positions") is None:
        dev["positions"] = jnp.asarray(np.maximum(np.cumsum(mask, axis=-1) - 1, 0), jnp.int32)
    return dev, max_new_tokens, max_len, None if eos is None else tuple(int(t) for t in eos)


# ---- compiled pieces -------------------------------------------------------------------------
def _logits(module: OmniModel, hidden: jax.Array) -> jax.Array:
    return module.llm.logits(hidden)


@functools.partial(jax.jit, static_argnames=("model", "max_len", "cache_dtype"))
def _prefill(model: OmniModel, variables: Any, batch: dict[str, jax.Array], *, max_len: int,
             cache_dtype: Any) -> tuple[jax.Array, dict, jax.Array]:
    """Spliced prompt -> (logits at each row's last token [batch, vocab], cache, next pos)."""
    c = model.config.llm
    b, p = batch["input_ids"].shape
    cache = init_cache(b, max_len, c.num_kv_heads, c.head_dim, c.num_layers, cache_dtype)
    out = model.apply(variables, batch, cache=cache, compute_logits=False)
    mask = batch["segment_ids"]
    last = p - 1 - jnp.argmax(mask[:, ::-1], axis=-1)  # last real token [batch]
    hidden = jnp.take_along_axis(out["hidden"], last[:, None, None], axis=1)  # [batch, 1, D]
    logits = model.apply(variables, hidden, method=_logits)[:, 0]  # [batch, vocab]
    next_pos = jnp.take_along_axis(batch["positions"], last[:, None], axis=1)[:, 0] + 1
    return logits, out["cache"], next_pos


def _token_logits(model: OmniModel, variables: Any, tok: jax.Array, pos: jax.Array,
                  cache: dict) -> tuple[jax.Array, dict]:
    """One text token per row (no media keys: towers do not run) -> logits [batch, vocab]."""
    ids = tok[:, None]  # [batch, 1]
    out = model.apply(variables, {"input_ids": ids, "modality": jnp.zeros_like(ids),
                                  "positions": pos[:, None]}, cache=cache)
    return out["logits"][:, 0], out["cache"]


def _emit(logits: jax.Array, done: jax.Array, rng: jax.Array, sampling: SamplingConfig,
          eos_id: EosIds, pad_id: int, vocab_limit: int | None
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    if vocab_limit is not None:  # ids past the tokenizer's (a padded embedding) never come out
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
    rng, key = jax.random.split(rng)
    tok = jnp.where(done, pad_id, sample_logits(logits, key, sampling))
    if eos_id is not None:  # a tuple of ids
        done = done | jnp.isin(tok, jnp.asarray(eos_id, jnp.int32))
    return tok, done, rng


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "eos_id",
                                             "pad_id", "vocab_limit"))
def _decode(model: OmniModel, variables: Any, logits: jax.Array, cache: dict,
            next_pos: jax.Array, rng: jax.Array, *, max_new_tokens: int,
            sampling: SamplingConfig, eos_id: EosIds, pad_id: int,
            vocab_limit: int | None) -> tuple[jax.Array, jax.Array]:
    """while_loop over one compiled text step; stops when every row has emitted EOS."""
    b = logits.shape[0]
    tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    tok, done, rng = _emit(logits, jnp.zeros((b,), bool), rng, sampling, eos_id, pad_id,
                           vocab_limit)
    tokens = tokens.at[:, 0].set(tok)

    def cond(state):
        return (state[0] < max_new_tokens) & ~jnp.all(state[4])

    def body(state):
        t, tok, cache, tokens, done, rng = state
        logits, cache = _token_logits(model, variables, tok, next_pos + t - 1, cache)
        tok, done, rng = _emit(logits, done, rng, sampling, eos_id, pad_id, vocab_limit)
        return t + 1, tok, cache, tokens.at[:, t].set(tok), done, rng

    state = (jnp.ones((), jnp.int32), tok, cache, tokens, done, rng)
    steps, _, _, tokens, _, _ = jax.lax.while_loop(cond, body, state)
    return tokens, steps


@functools.partial(jax.jit, static_argnames=("sampling", "eos_id", "pad_id", "vocab_limit"))
def _first(logits: jax.Array, rng: jax.Array, *, sampling: SamplingConfig, eos_id: EosIds,
           pad_id: int, vocab_limit: int | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    done = jnp.zeros((logits.shape[0],), bool)
    return _emit(logits, done, rng, sampling, eos_id, pad_id, vocab_limit)


@functools.partial(jax.jit, static_argnames=("model", "sampling", "eos_id", "pad_id",
                                             "vocab_limit"), donate_argnames=("cache",))
def _step(model: OmniModel, variables: Any, tok: jax.Array, pos: jax.Array, cache: dict,
          done: jax.Array, rng: jax.Array, *, sampling: SamplingConfig, eos_id: EosIds,
          pad_id: int, vocab_limit: int | None) -> tuple[jax.Array, dict, jax.Array, jax.Array]:
    logits, cache = _token_logits(model, variables, tok, pos, cache)
    tok, done, rng = _emit(logits, done, rng, sampling, eos_id, pad_id, vocab_limit)
    return tok, cache, done, rng


# ---- public API ------------------------------------------------------------------------------
def generate_omni(model: OmniModel, variables: Any, batch: Mapping[str, Any], *,
                  max_new_tokens: int | None, eos_id: int | Sequence[int] | None,
                  sampling: SamplingConfig = GREEDY, rng: jax.Array | None = None,
                  max_len: int | None = None, pad_id: int = 0, vocab_limit: int | None = None,
                  cache_dtype: str | Any = "float32") -> jax.Array:
    """Generate after a (padded) omni prompt -> tokens [batch, steps] int32.

    batch: input_ids / modality [batch, prompt_len] (+ segment_ids 0/1 mask for padded rows,
    media arrays as OmniModel takes them). Stops after max_new_tokens or when every row has
    emitted eos_id (one id or several, e.g. <|im_end|> and <|endoftext|>; steps <=
    max_new_tokens; a row's EOS is kept, pad_id after it).
    max_len: KV cache length (default prompt_len + max_new_tokens; with max_new_tokens=None,
    max_position_embeddings, and generation runs to EOS within it). vocab_limit: only ids
    below it are generated (the tokenizer's size when the embedding table is padded larger).
    """
    dev, max_new_tokens, max_len, eos_id = _prepare(model, variables, batch, max_new_tokens, eos_id,
                                            pad_id, sampling, rng, max_len, vocab_limit)
    logits, cache, next_pos = _prefill(model, variables, dev, max_len=max_len,
                                       cache_dtype=parse_dtype(cache_dtype))
    rng = jax.random.key(0) if rng is None else rng
    tokens, steps = _decode(model, variables, logits, cache, next_pos, rng,
                            max_new_tokens=max_new_tokens, sampling=sampling, eos_id=eos_id,
                            pad_id=pad_id, vocab_limit=vocab_limit)
    return tokens[:, :int(steps)]


def stream_omni(model: OmniModel, variables: Any, batch: Mapping[str, Any], *,
                max_new_tokens: int | None, eos_id: int | Sequence[int] | None,
                sampling: SamplingConfig = GREEDY, rng: jax.Array | None = None,
                max_len: int | None = None, pad_id: int = 0, vocab_limit: int | None = None,
                cache_dtype: str | Any = "float32") -> Iterator[np.ndarray]:
    """`generate_omni` one step at a time: yields each step's tokens [batch] (host int32) as
    soon as they exist; the same tokens as generate_omni (same rng use). Arguments are
    checked when called, before the first token."""
    dev, max_new_tokens, max_len, eos_id = _prepare(model, variables, batch, max_new_tokens, eos_id,
                                            pad_id, sampling, rng, max_len, vocab_limit)
    kw = {"sampling": sampling, "eos_id": eos_id, "pad_id": pad_id, "vocab_limit": vocab_limit}

    def steps() -> Iterator[np.ndarray]:
        logits, cache, next_pos = _prefill(model, variables, dev, max_len=max_len,
                                           cache_dtype=parse_dtype(cache_dtype))
        tok, done, key = _first(logits, jax.random.key(0) if rng is None else rng, **kw)
        for t in range(1, max_new_tokens + 1):
            nxt = None
            if t < max_new_tokens:  # dispatch the next step before reading this one
                nxt = _step(model, variables, tok, next_pos + t - 1, cache, done, key, **kw)
            host, finished = np.asarray(tok), bool(np.all(np.asarray(done)))
            yield host
            if finished or nxt is None:
                return
            tok, cache, done, key = nxt

    return steps()
