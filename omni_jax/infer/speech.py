"""Speech out at inference: the trained generator + a vocoder on the LLM's hidden states, framed
as in training, and Ola-style sentence-wise streaming of text and audio.

Training (data.speech) feeds the generator the LLM's last hidden states at the assistant turn's
positions, template included (<|im_start|>assistant\\n, content, <|im_end|>, \\n), and the
answer's content tokens as text. The hidden state of a position is the LLM's output when that
token is the input, so a generated token's state comes from the decode step that feeds it
back. Per sentence (the sentence's tokens: infer.stream.SentenceTokens) the rows are its token
positions, plus the header positions (the prompt's last `header_len` states) for the first
sentence and the footer (<|im_end|> then \\n, fed after the answer whatever stop id ended it)
for the last; the text is the sentence's tokens. A one-sentence answer is thus framed exactly as
in training; `speak_sentences([answer_ids])` frames a whole answer exactly so.
`stream_speech` yields TextDelta events as tokens decode and an AudioChunk per sentence once
its states exist; `speak_sentences` is the same without streaming (one full forward).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.infer.generate import SamplingConfig
from omni_jax.infer.omni import GREEDY, _emit, _first, _logits, _prepare
from omni_jax.infer.stream import SentenceTokens, SplitterConfig
from omni_jax.layers.attention import init_cache
from omni_jax.layers.common import parse_dtype
from omni_jax.model import OmniModel
from omni_jax.speech.config import SpeechGenConfig
from omni_jax.speech.decode import ar_sample, ctc_greedy
from omni_jax.speech.generator import SpeechGenerator, check_speech_batch
from omni_jax.speech.vocode_pool import voice


@dataclasses.dataclass(frozen=True)
class TextDelta:
    """Decoded text of one step (and the sentences it completed) of answer `row`."""

    text: str
    sentences: tuple[str, ...] = ()
    row: int = 0


@dataclasses.dataclass(frozen=True)
class AudioChunk:
    """Speech of sentence `index` of answer `row`: float32 wav [samples], its units."""

    wav: np.ndarray
    sample_rate: int
    sentence: str
    units: np.ndarray
    row: int = 0
    index: int = 0
    token_ids: tuple[int, ...] = ()


def _bucket(n: int, least: int) -> int:
    """Padded length: the next power of two >= n, at least `least` (few compiled shapes)."""
    return max(least, 1 << max(0, int(n) - 1).bit_length())


class SpeechOut:
    """Generator (config + params) + vocoder + the template's assistant framing -> speech."""

    def __init__(self, config: SpeechGenConfig, params: Any, vocoder: Any, *, header_len: int,
                 footer_ids: Sequence[int], collapse_repeats: bool = True,
                 min_bucket: int = 16) -> None:
        if not isinstance(config, SpeechGenConfig):
            raise ValueError(f"SpeechOut: config must be a SpeechGenConfig, got "
                             f"{type(config).__name__}")
        if vocoder is None or not callable(vocoder) or not hasattr(vocoder, "sample_rate"):
            raise ValueError("SpeechOut: a vocoder (sample_rate, __call__(units) -> wav) is "
                             "needed to turn the generator's units into audio; got "
                             f"{type(vocoder).__name__}")
        voc = getattr(vocoder, "vocab_size", None)
        if voc is not None and voc < config.unit_vocab:
            raise ValueError(f"SpeechOut: the generator emits units [0, {config.unit_vocab}) but "
                             f"the vocoder knows only {voc}")
        if header_len < 0 or len(footer_ids) == 0:
            raise ValueError(f"SpeechOut: header_len must be >= 0 and footer_ids non-empty, got "
                             f"{header_len}, {list(footer_ids)}")
        self.config, self.params, self.vocoder = config, params, vocoder
        self.module = SpeechGenerator(config)
        self.header_len, self.footer_ids = int(header_len), tuple(int(t) for t in footer_ids)
        self.collapse_repeats, self.min_bucket = bool(collapse_repeats), int(min_bucket)
        self.sample_rate = int(vocoder.sample_rate)
        self._ctc = jax.jit(functools.partial(self.module.apply, method=SpeechGenerator.ctc))

    @classmethod
    def from_template(cls, config: SpeechGenConfig, params: Any, vocoder: Any, template: Any,
                      **kw: Any) -> SpeechOut:
        """Header length and footer ids as data.speech frames a training example."""
        from omni_jax.data.speech import SpeechTargets, turn_rows

        tok = template.tokenizer
        header_len = SpeechTargets(template).header_len
        ex = template.encode([{"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "ok"}])
        loss = np.asarray(ex.loss_mask).astype(bool)
        end = int(np.nonzero(loss)[0][-1])  # the answer's <|im_end|>
        rows = turn_rows(loss, header_len).astype(bool)
        footer = [int(t) for t in np.asarray(ex.input_ids)[end:][rows[end:]]]
        if footer[0] != tok.im_end_id:
            raise ValueError("SpeechOut.from_template: the assistant turn does not end with "
                             "<|im_end|>")
        return cls(config, params, vocoder, header_len=header_len, footer_ids=footer, **kw)


    def speak(self, hidden: Any, row_mask: Any, text_ids: Any, text_mask: Any = None, *,
              rng: Any = None) -> tuple[Any, Any]:
        """One sentence (hidden [R, H], row_mask [R], text_ids [S]) -> (units, wav), or a batch
        ([B, R, H], [B, R], [B, S], text_mask [B, S]) -> (list of units, list of wavs).
        rng: AR sampling (one key, or [B] keys); CTC decodes greedily."""
        single = np.ndim(hidden) == 2
        if single:
            hidden, row_mask, text_ids = (np.asarray(x)[None] for x in (hidden, row_mask,
                                                                         text_ids))
            text_mask = None if text_mask is None else np.asarray(text_mask)[None]
        hidden = np.asarray(hidden, np.float32)
        text_ids = np.asarray(text_ids, np.int32)
        text_mask = np.ones(text_ids.shape, bool) if text_mask is None else np.asarray(
            text_mask).astype(bool)
        row_mask = np.asarray(row_mask).astype(bool)
        if text_ids.ndim == 2 and (text_mask.sum(axis=1) == 0).any():
            raise ValueError("SpeechOut.speak: a sentence has empty text (no token ids)")
        check_speech_batch(self.config, {"hidden": hidden, "row_mask": row_mask,
                                         "text_ids": text_ids, "text_mask": text_mask})
        variables = {"params": self.params}
        if self.config.mode == "ctc":
            out = self._ctc(variables, hidden, row_mask, text_ids, text_mask)
            units = ctc_greedy(out["speech_log_probs"], out["speech_frame_mask"],
                               collapse_repeats=self.collapse_repeats)
        else:  # AR: at most `upsample` units per text token (the CTC frames' bound)
            padded, lengths = ar_sample(self.module, variables, hidden, row_mask, text_ids,
                                        text_mask, rng=jax.random.key(0) if rng is None else rng,
                                        max_units=self.config.upsample * text_ids.shape[1])
            units = [padded[b, :lengths[b]] for b in range(len(lengths))]
        wavs = [voice(self.vocoder, u) for u in units]
        return (units[0], wavs[0]) if single else (units, wavs)

    def speak_rows(self, rows: Sequence[np.ndarray], texts: Sequence[Sequence[int]], *,
                   rng: Any = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Sentences of different lengths (rows [r_i, H], text ids [s_i]) -> one padded batch
        (lengths rounded up to powers of two: few compiles) -> (units, wavs)."""
        if len(rows) != len(texts) or not rows:
            raise ValueError(f"SpeechOut.speak_rows: {len(rows)} row sets for {len(texts)} "
                             f"texts; give one per sentence (at least one)")
        if any(len(t) == 0 for t in texts):
            raise ValueError("SpeechOut.speak_rows: a sentence has empty text (no token ids)")
        s = _bucket(max(len(t) for t in texts), self.min_bucket)
        r = s + self.header_len + len(self.footer_ids)
        b, h = len(rows), self.config.llm_hidden
        hidden, row_mask = np.zeros((b, r, h), np.float32), np.zeros((b, r), bool)
        ids, mask = np.zeros((b, s), np.int32), np.zeros((b, s), bool)
        for i, (x, t) in enumerate(zip(rows, texts)):
            x = np.asarray(x, np.float32).reshape(-1, h)
            if len(x) > r or len(t) > s:
                raise ValueError(f"SpeechOut.speak_rows: sentence {i} has {len(x)} rows for "
                                 f"{len(t)} tokens; at most tokens + header + footer rows")
            hidden[i, :len(x)], row_mask[i, :len(x)] = x, True
            ids[i, :len(t)], mask[i, :len(t)] = t, True
        return self.speak(hidden, row_mask, ids, mask, rng=rng)


def sentence_key(rng: Any, row: int, index: int) -> jax.Array:
    """The AR sampling key of sentence `index` of answer `row` (same streamed or not)."""
    return jax.random.fold_in(jax.random.fold_in(rng, row), index)


def _frame(speech: SpeechOut, header: np.ndarray, hidden: Sequence[np.ndarray],
           footer: np.ndarray | None, span: Sequence[Any], first: bool) -> np.ndarray:
    """Rows of one sentence: [header (first)] + its tokens' states + [footer (last)]."""
    _, a, b = span
    parts = ([header] if first else []) + [np.asarray(hidden[a:b]).reshape(
        -1, header.shape[-1])] + ([footer] if footer is not None else [])
    return np.concatenate(parts)


def _chunk(speech: SpeechOut, rows: np.ndarray, span: Sequence[Any], tokens: Sequence[int],
           row: int, index: int, rng: Any) -> AudioChunk:
    text, a, b = span
    ids = tuple(int(t) for t in tokens[a:b])
    if not ids:  # the sentence's text sits in a token of the previous one: nothing to say
        units, wav = np.zeros((0,), np.int32), np.zeros((0,), np.float32)
    else:
        (units,), (wav,) = speech.speak_rows([rows], [ids],
                                             rng=sentence_key(rng, row, index)[None])
    return AudioChunk(wav, speech.sample_rate, text, units, row, index, ids)


# ---- compiled pieces -------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("model", "max_len", "cache_dtype", "header_len"))
def _prefill(model: OmniModel, variables: Any, batch: dict[str, jax.Array], *, max_len: int,
             cache_dtype: Any, header_len: int) -> tuple[jax.Array, dict, jax.Array, jax.Array]:
    """infer.omni's prefill + the states of each row's last header_len prompt tokens."""
    c = model.config.llm
    b, p = batch["input_ids"].shape
    cache = init_cache(b, max_len, c.num_kv_heads, c.head_dim, c.num_layers, cache_dtype)
    out = model.apply(variables, batch, cache=cache, compute_logits=False)
    last = p - 1 - jnp.argmax(batch["segment_ids"][:, ::-1], axis=-1)  # [b]
    hidden = jnp.take_along_axis(out["hidden"], last[:, None, None], axis=1)  # [b, 1, D]
    logits = model.apply(variables, hidden, method=_logits)[:, 0]  # [b, vocab]
    next_pos = jnp.take_along_axis(batch["positions"], last[:, None], axis=1)[:, 0] + 1
    idx = jnp.clip(last[:, None] - header_len + 1 + jnp.arange(header_len)[None], 0, p - 1)
    header = jnp.take_along_axis(out["hidden"], idx[..., None], axis=1)  # [b, h, D]
    return logits, out["cache"], next_pos, header.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("model", "sampling", "pad_id", "vocab_limit"),
                   donate_argnames=("cache",))
def _step(model: OmniModel, variables: Any, tok: jax.Array, pos: jax.Array, cache: dict,
          rng: jax.Array, *, sampling: SamplingConfig, pad_id: int, vocab_limit: int | None
          ) -> tuple[jax.Array, jax.Array, dict, jax.Array]:
    """Feed tok [b] -> (next token [b], the fed token's state [b, D], cache, rng)."""
    ids = tok[:, None]
    out = model.apply(variables, {"input_ids": ids, "modality": jnp.zeros_like(ids),
                                  "positions": pos[:, None]}, cache=cache)
    nxt, _, rng = _emit(out["logits"][:, 0], jnp.zeros(tok.shape, bool), rng, sampling, None,
                        pad_id, vocab_limit)
    return nxt, out["hidden"][:, 0].astype(jnp.float32), out["cache"], rng


# ---- streaming -------------------------------------------------------------------------------
def stream_speech(model: OmniModel, variables: Any, batch: Mapping[str, Any],
                  speech: SpeechOut, decode: Callable[[Sequence[int]], str], *,
                  max_new_tokens: int | None, eos_id: int | Sequence[int],
                  sampling: SamplingConfig = GREEDY, rng: jax.Array | None = None,
                  pad_id: int = 0, vocab_limit: int | None = None,
                  cache_dtype: str | Any = "float32", forced_tokens: Any = None,
                  background: bool = True, splitter: SplitterConfig | None = None,
                  speech_rng: jax.Array | None = None) -> Iterator[TextDelta | AudioChunk]:
    """Decode answers to a batch of prompts -> TextDelta / AudioChunk events (`row` = answer).

    Tokens are those of generate_omni (same rng use). A sentence is spoken once its span is
    final and its states exist: on one worker thread while decoding goes on (background; a
    chunk is yielded at the first step after it is done, the rest at the end) or inline, right
    after the next decode step was dispatched (deterministic order). forced_tokens [B, n]:
    feed these tokens instead of sampling (a row ends at a stop id or after n): speech of a
    given answer with the model's own states. speech_rng: AR sampling (sentence_key).
    """
    if not isinstance(speech, SpeechOut):
        raise ValueError(f"stream_speech: speech must be a SpeechOut, got {type(speech).__name__}")
    forced = None if forced_tokens is None else np.asarray(forced_tokens)
    if forced is not None:
        if forced.ndim != 2 or forced.shape[0] != np.shape(batch["input_ids"])[0] \
                or forced.shape[1] == 0 or not np.issubdtype(forced.dtype, np.integer):
            raise ValueError(f"stream_speech: forced_tokens must be int [batch, n > 0], got "
                             f"{forced.shape} {forced.dtype}")
        max_new_tokens = forced.shape[1]
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"stream_speech: max_new_tokens must be a positive int, got "
                         f"{max_new_tokens!r}")
    n_foot = len(speech.footer_ids)
    max_len = np.shape(batch["input_ids"])[1] + max_new_tokens + n_foot
    dev, max_new, max_len, stops = _prepare(model, variables, batch, max_new_tokens, eos_id,
                                            pad_id, sampling, rng, max_len, vocab_limit)
    if (np.asarray(dev["segment_ids"]).sum(axis=1) < speech.header_len).any():
        raise ValueError(f"stream_speech: a prompt is shorter than the assistant header "
                         f"({speech.header_len} tokens)")
    kw = {"sampling": sampling, "pad_id": pad_id, "vocab_limit": vocab_limit}
    return _events(model, variables, dev, speech, decode, forced, max_new, max_len,
                   set(stops), kw, parse_dtype(cache_dtype), background, splitter,
                   jax.random.key(0) if rng is None else rng,
                   jax.random.key(0) if speech_rng is None else speech_rng)


def _events(model, variables, dev, speech, decode, forced, max_new, max_len, stops, kw,
            cache_dtype, background, splitter, rng, speech_rng):
    b = dev["input_ids"].shape[0]
    logits, cache, next_pos, header = _prefill(model, variables, dev, max_len=max_len,
                                               cache_dtype=cache_dtype,
                                               header_len=speech.header_len)
    sampled, _, key = _first(logits, rng, eos_id=None, **kw)
    header = np.asarray(header)
    rows = [SentenceTokens(decode, splitter) for _ in range(b)]
    states: list[list[np.ndarray]] = [[] for _ in range(b)]
    footers: list[list[np.ndarray]] = [[] for _ in range(b)]
    phase = [0] * b  # 0: answer, 1..n_foot: footer token fed next, n_foot + 1: all fed
    said = [0] * b  # sentences handed to the generator per row
    n_foot = len(speech.footer_ids)
    pool = ThreadPoolExecutor(1, "speech") if background else None
    pending: list[Future] = []

    def submit(i: int) -> Iterator[AudioChunk]:
        tr = rows[i]
        ready = tr.sealed()
        while said[i] < ready:
            k, span = said[i], tr.spans[said[i]]
            last = tr.finished and k == len(tr.spans) - 1
            if span[2] > len(states[i]) or (last and len(footers[i]) < n_foot):
                return
            framed = _frame(speech, header[i], states[i], np.stack(footers[i]) if last
                            else None, span, k == 0)
            args = (speech, framed, span, tr.tokens, i, k, speech_rng)
            said[i] += 1
            if pool is None:
                yield _chunk(*args)
            else:
                pending.append(pool.submit(_chunk, *args))

    def drain(wait: bool) -> Iterator[AudioChunk]:
        while pending and (wait or pending[0].done()):
            yield pending.pop(0).result()

    fed: list[str | None] = [None] * b  # what each row fed in the step in flight
    hidden = None
    try:
        for t in range(max_new + n_foot + 1):
            host = np.asarray(sampled)  # waits for step t - 1
            if hidden is not None:  # the states of the tokens step t - 1 fed
                h = np.asarray(hidden)
                for i in range(b):
                    if fed[i] is not None:
                        (states if fed[i] == "text" else footers)[i].append(h[i])
            if all(p > n_foot for p in phase):
                for i in range(b):
                    yield from submit(i)
                break
            feed, new, fed = np.full((b,), kw["pad_id"], np.int32), {}, [None] * b
            for i in range(b):
                if phase[i] == 0:
                    x = int(forced[i, t]) if forced is not None and t < forced.shape[1] \
                        else int(host[i])
                    if x in stops or t >= max_new:
                        phase[i] = 1
                    else:
                        feed[i], new[i], fed[i] = x, x, "text"
                if 1 <= phase[i] <= n_foot:
                    feed[i], fed[i] = speech.footer_ids[phase[i] - 1], "footer"
                    phase[i] += 1
            sampled, hidden, cache, key = _step(model, variables, jnp.asarray(feed),
                                                next_pos + t, cache, key, **kw)
            for i in range(b):  # text and speech while step t computes
                if i in new:
                    delta, done = rows[i].push(new[i])
                elif fed[i] == "footer" and not rows[i].finished:
                    delta, done = rows[i].finish()
                else:
                    continue
                if delta or done:
                    yield TextDelta(delta, tuple(done), i)
            for i in range(b):
                yield from submit(i)
            yield from drain(wait=False)
        yield from drain(wait=True)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


# ---- non-streamed ----------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("model",))
def _hidden(model: OmniModel, variables: Any, batch: dict[str, jax.Array]) -> jax.Array:
    return model.apply(variables, batch, compute_logits=False)["hidden"].astype(jnp.float32)


def speak_sentences(model: OmniModel, variables: Any, batch: Mapping[str, Any],
                    speech: SpeechOut, sentences: Sequence[Sequence[int]], *,
                    texts: Sequence[str] | None = None, speech_rng: jax.Array | None = None
                    ) -> list[AudioChunk]:
    """Speak a given answer (its sentences' token ids, in order) to a prompt of one row: one
    full forward over prompt + answer + footer, the per-sentence framing of stream_speech,
    every sentence in one generator batch. [answer_ids]: the whole answer as in training."""
    ids = np.asarray(batch["input_ids"])
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"speak_sentences: a batch of one prompt, got input_ids {ids.shape}")
    if not sentences or any(len(s) == 0 for s in sentences):
        raise ValueError("speak_sentences: give non-empty sentences (token ids each)")
    answer = np.asarray([int(t) for s in sentences for t in s] + list(speech.footer_ids),
                        np.int32)
    dev, *_ = _prepare(model, variables, batch, len(answer), None, 0, GREEDY, None, None, None)
    p = ids.shape[1]
    fill = {"modality": 0, "segment_ids": 1, "media_index": -1}  # the answer's tokens: text
    full = {**dev, "input_ids": jnp.concatenate([dev["input_ids"], answer[None]], axis=1),
            **{k: jnp.pad(dev[k], ((0, 0), (0, len(answer))), constant_values=v)
               for k, v in fill.items() if k in dev}}
    full["positions"] = jnp.maximum(jnp.cumsum(full["segment_ids"], axis=-1) - 1, 0)
    hidden = np.asarray(_hidden(model, variables, full))[0]  # [p + answer, D]
    last = p - 1 - int(np.argmax(np.asarray(dev["segment_ids"])[0, ::-1]))
    header = hidden[last - speech.header_len + 1:last + 1]
    states, footer = hidden[p:p + len(answer) - len(speech.footer_ids)], hidden[
        p + len(answer) - len(speech.footer_ids):]
    spans, start = [], 0
    for k, s in enumerate(sentences):
        spans.append((texts[k] if texts else "", start, start + len(s)))
        start += len(s)
    framed = [_frame(speech, header, states, footer if k == len(spans) - 1 else None, span,
                     k == 0) for k, span in enumerate(spans)]
    speech_rng = jax.random.key(0) if speech_rng is None else speech_rng
    keys = jnp.stack([sentence_key(speech_rng, 0, k) for k in range(len(spans))])
    units, wavs = speech.speak_rows(framed, [list(s) for s in sentences], rng=keys)
    return [AudioChunk(w, speech.sample_rate, span[0], u, 0, k, tuple(int(t) for t in s))
            for k, (w, u, span, s) in enumerate(zip(wavs, units, spans, sentences))]
