"""A deterministic synthetic speech-generation task: (LLM states, response text) -> units.

Structure (a toy of OpenOmni's stage IV / V data):
- a vocabulary of `num_words` words (text token ids `first_word_id + w`); each word has a fixed
  neutral pronunciation of 2-4 units drawn from [0, neutral_units) (no unit repeated inside a
  word). The first `num_homographs` words have two senses with different pronunciations; the
  text id is the same, the sense shows only in the LLM states (the LLM knows the meaning), so
  the generator must read the states (cross-attention from the text queries) to pronounce it;
- a response = a random word sequence; its units = the words' pronunciations concatenated,
  each unit repeated `rate` times, a per-item speaking rate in `rates` that again only the LLM
  states carry;
- LLM states = one row per position of a fake chat row: `prompt rows` (not part of the turn,
  unmarked), the assistant header (<|im_start|>, "assistant", "\\n"), one row per response
  token, <|im_end|> and "\\n" (all marked in speech_rows, the OpenOmni training framing). A row
  = a fixed random token embedding (+ a sense vector for homographs) + `context` x the mean of
  the earlier rows (causal mixing, as an LLM's states carry context) + a rate vector + noise;
- `lead_token` (default on): the response text starts with a silent token (id LEAD, empty
  pronunciation), so the CTC frames of the first real word follow one lead-in segment. A
  generator without `segment_positions` needs it: the frames of the first response token are
  identical and see nothing else (causal decoder, RoPE only, no lead-in frames), so their
  outputs are identical and greedy CTC can emit at most one unit there; without it the first
  word is mostly lost (tests/speech/test_learning.py measures both);
- an "expressive" rendering (DPO's chosen side) of the same response replaces each word's first
  unit by a word-specific style unit from [neutral_units, unit_vocab); the neutral one is the
  rejected side. `style_fraction` measures the share of style units in decoded units.

`batch(items)` gives the SpeechLM batch (speech_hidden, speech_rows, speech_text_ids/_mask,
speech_units/_mask, and with `rejected` the _rejected pair), at static shapes. Evaluation
`stream` yields training batches; `tiny_generator_config` is a generator size that learns the
task on CPU. Evaluation helpers: `references`, `edit_distance`, `unit_error_rate` (greedy
decoding lives in omni_jax.speech.decode).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

Item = tuple[tuple[int, ...], tuple[int, ...], int]  # (words, senses, rate)

IM_START, ASSISTANT, NEWLINE, IM_END, PROMPT, LEAD = 1, 2, 3, 4, 5, 6  # template ids
HEADER, TRAILER = (IM_START, ASSISTANT, NEWLINE), (IM_END, NEWLINE)


@dataclasses.dataclass(frozen=True)
class SyntheticSpeechTask:
    """Fixed tables (from `seed`) of a words -> units task; see the module docstring."""

    llm_hidden: int = 32
    num_words: int = 24
    num_homographs: int = 6
    first_word_id: int = 8
    unit_vocab: int = 40
    neutral_units: int = 28
    pron_len: tuple[int, int] = (2, 4)  # inclusive range of units per word
    min_words: int = 2
    max_words: int = 6
    rates: tuple[int, ...] = (1,)
    max_prompt_rows: int = 3
    context: float = 0.3
    noise: float = 0.1
    lead_token: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        lo, hi = self.pron_len
        if not 1 <= lo <= hi or self.neutral_units < hi or self.neutral_units >= self.unit_vocab:
            raise ValueError(f"SyntheticSpeechTask: need 1 <= pron_len[0] <= pron_len[1] <= "
                             f"neutral_units < unit_vocab, got {self.pron_len}, "
                             f"{self.neutral_units}, {self.unit_vocab}")
        if not 0 <= self.num_homographs <= self.num_words or self.first_word_id <= LEAD:
            raise ValueError("SyntheticSpeechTask: bad num_homographs / first_word_id")
        if not 1 <= self.min_words <= self.max_words or min(self.rates) < 1:
            raise ValueError("SyntheticSpeechTask: need 1 <= min_words <= max_words, rates >= 1")
        rng = np.random.default_rng(self.seed)
        neutral = {}
        for w in range(self.num_words):
            for s in range(2 if w < self.num_homographs else 1):
                n = int(rng.integers(lo, hi + 1))
                neutral[w, s] = tuple(int(u) for u in rng.choice(self.neutral_units, n, False))
        style = rng.integers(self.neutral_units, self.unit_vocab, self.num_words)
        h = self.llm_hidden
        tables = {
            "neutral": neutral,
            "expressive": {k: (int(style[k[0]]),) + v[1:] for k, v in neutral.items()},
            "embed": rng.standard_normal((self.text_vocab, h)).astype(np.float32),
            "sense": rng.standard_normal((self.num_words, 2, h)).astype(np.float32),
            "rate": rng.standard_normal((max(self.rates) + 1, h)).astype(np.float32),
        }
        object.__setattr__(self, "_tables", tables)

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def text_vocab(self) -> int:
        """Token ids in use (template + words): the generator's decoder.vocab_size floor."""
        return self.first_word_id + self.num_words

    @property
    def max_text(self) -> int:
        """S: response tokens of the longest response (with the lead token)."""
        return self.max_words + int(self.lead_token)

    @property
    def max_rows(self) -> int:
        """R: prompt + header + response + trailer rows."""
        return self.max_prompt_rows + len(HEADER) + self.max_text + len(TRAILER)

    @property
    def max_units(self) -> int:
        """U: units of the longest response at the slowest rate."""
        return self.max_words * self.pron_len[1] * max(self.rates)

    def pronunciation(self, word: int, sense: int = 0, style: str = "neutral") -> tuple[int, ...]:
        """The units of one word (sense 0 for non-homographs)."""
        return self._tables[style][word, sense if word < self.num_homographs else 0]

    # ---- items -------------------------------------------------------------------------------
    def sample(self, n: int, seed: int, *, lengths: Sequence[int] | None = None,
               exclude: Sequence[Item] = ()) -> list[Item]:
        """n distinct random items (words, senses, rate) not in `exclude`; a homograph keeps
        one sense within an item (the text queries carry no position, so two senses of one
        word in one response could not be told apart)."""
        rng = np.random.default_rng(seed)
        lengths = list(lengths or range(self.min_words, self.max_words + 1))
        seen = {tuple(i[0]) for i in exclude}
        out: list[Item] = []
        for _ in range(1000 * n):
            if len(out) == n:
                return out
            words = tuple(int(w) for w in rng.integers(0, self.num_words, rng.choice(lengths)))
            if words in seen:  # held-out: new word sequences, whatever the senses
                continue
            seen.add(words)
            sense = {w: int(rng.integers(0, 2)) if w < self.num_homographs else 0
                     for w in set(words)}
            out.append((words, tuple(sense[w] for w in words), int(rng.choice(self.rates))))
        raise ValueError(f"SyntheticSpeechTask.sample: could not draw {n} distinct items")

    def units(self, item: Item, style: str = "neutral") -> np.ndarray:
        """The item's target units: pronunciations concatenated, each unit repeated rate times."""
        words, senses, rate = item
        seq = [u for w, s in zip(words, senses) for u in self.pronunciation(w, s, style)]
        return np.repeat(np.asarray(seq, np.int32), rate)

    def text_ids(self, item: Item) -> list[int]:
        """The response's token ids (LEAD first with lead_token)."""
        return [LEAD] * int(self.lead_token) + [self.first_word_id + w for w in item[0]]

    def states(self, item: Item, prompt_rows: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
        """(rows [n, H] float32, turn mask [n] bool) of one item's chat row."""
        t = self._tables
        words, senses, rate = item
        ids = [PROMPT] * prompt_rows + list(HEADER) + self.text_ids(item) + list(TRAILER)
        x = t["embed"][ids].copy()
        first = prompt_rows + len(HEADER) + int(self.lead_token)
        for j, (w, s) in enumerate(zip(words, senses)):
            if w < self.num_homographs:
                x[first + j] += t["sense"][w, s]
        mean_before = np.cumsum(x, axis=0) - x
        mean_before /= np.maximum(np.arange(len(ids)), 1)[:, None]
        h = x + self.context * mean_before + t["rate"][rate]
        h += self.noise * rng.standard_normal(h.shape).astype(np.float32)
        return h.astype(np.float32), np.arange(len(ids)) >= prompt_rows

    def batch(self, items: Sequence[Item], seed: int = 0, *,
              chosen: str | Sequence[str] = "neutral", rejected: str | None = None
              ) -> dict[str, np.ndarray]:
        """The SpeechLM batch of `items` at static shapes [B, R | S | U] (row noise and
        prompt lengths from `seed`). speech_units holds the `chosen` style (one for all, or one
        per item); with `rejected`, speech_units_rejected / _mask_rejected hold that style."""
        rng = np.random.default_rng(seed)
        b, r, s, u = len(items), self.max_rows, self.max_text, self.max_units
        out = {"speech_hidden": np.zeros((b, r, self.llm_hidden), np.float32),
               "speech_rows": np.zeros((b, r), np.int32),
               "speech_text_ids": np.zeros((b, s), np.int32),
               "speech_text_mask": np.zeros((b, s), np.int32)}
        styles = [chosen] * b if isinstance(chosen, str) else list(chosen)
        if len(styles) != b:
            raise ValueError(f"SyntheticSpeechTask.batch: {len(styles)} styles for {b} items")
        sides = [("", styles)] + ([("_rejected", [rejected] * b)] if rejected else [])
        for sfx, _ in sides:
            out["speech_units" + sfx] = np.zeros((b, u), np.int32)
            out["speech_unit_mask" + sfx] = np.zeros((b, u), np.int32)
        for i, item in enumerate(items):
            h, turn = self.states(item, int(rng.integers(0, self.max_prompt_rows + 1)), rng)
            out["speech_hidden"][i, :len(h)], out["speech_rows"][i, :len(h)] = h, turn
            ids = self.text_ids(item)
            out["speech_text_ids"][i, :len(ids)], out["speech_text_mask"][i, :len(ids)] = ids, 1
            for sfx, style in sides:
                units = self.units(item, style[i])
                out["speech_units" + sfx][i, :len(units)] = units
                out["speech_unit_mask" + sfx][i, :len(units)] = 1
        return out

    def stream(self, items: Sequence[Item], batch_size: int, seed: int = 0, *,
               expressive: float = 0.0, rejected: str | None = None
               ) -> Iterator[dict[str, np.ndarray]]:
        """Endless training batches: `batch_size` distinct items drawn at random per batch, the
        chosen units expressive with probability `expressive` per item (else neutral), fresh
        row noise per batch; with `rejected`, that style on the rejected side."""
        rng = np.random.default_rng(seed)
        for step in itertools.count():
            idx = rng.choice(len(items), batch_size, replace=False)
            styles = np.where(rng.random(batch_size) < expressive, "expressive", "neutral")
            yield self.batch([items[i] for i in idx], seed=seed * 1_000_003 + step,
                             chosen=[str(x) for x in styles], rejected=rejected)

    @staticmethod
    def references(batch: Mapping[str, np.ndarray], rejected: bool = False) -> list[list[int]]:
        """A batch's target units per item (the rejected side with `rejected`)."""
        sfx = "_rejected" if rejected else ""
        return [[int(x) for x in u[m > 0]] for u, m in zip(batch["speech_units" + sfx],
                                                           batch["speech_unit_mask" + sfx])]

    def style_fraction(self, units: Sequence[Sequence[int]]) -> float:
        """Share of style-specific units (>= neutral_units) among all decoded units."""
        total = sum(len(x) for x in units)
        return sum(int(np.sum(np.asarray(x) >= self.neutral_units)) for x in units) / max(total,
                                                                                         1)


def tiny_generator_config(task: SyntheticSpeechTask, mode: str = "ctc", **overrides: Any
                          ) -> Any:
    """The "tiny" SpeechGenConfig sized for `task` (its LLM width, text ids and units) that
    trains on it in a few hundred CPU steps: upsample 8 (2-4x the units of a word, as the paper's
    12 frames per BPE token) and initializer_range 0.05 (0.02 leaves a long blank-only plateau
    at this width). `overrides` go to speech_preset (e.g. num_experts)."""
    from omni_jax.speech.config import speech_preset

    kw: dict[str, Any] = {"unit_vocab": task.unit_vocab, "upsample": 8, **overrides}
    cfg = speech_preset("tiny", task.llm_hidden, mode, text_vocab=task.text_vocab, **kw)
    if "decoder" in overrides:
        return cfg
    return dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder,
                                                                initializer_range=0.05))


# ------------------------------------------------------------------------------- evaluation

def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance (unit substitutions, insertions, deletions)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def unit_error_rate(hyps: Sequence[Sequence[int]], refs: Sequence[Sequence[int]]) -> float:
    """Sum of edit distances / sum of reference lengths (a corpus-level WER over units)."""
    if len(hyps) != len(refs):
        raise ValueError(f"unit_error_rate: {len(hyps)} hypotheses for {len(refs)} references")
    errors = sum(edit_distance(h, r) for h, r in zip(hyps, refs))
    return errors / max(sum(len(r) for r in refs), 1)
