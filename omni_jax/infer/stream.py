"""Ola-style sentence-wise streaming: speak each sentence while the answer is still decoding.

As decoded text grows, complete sentences are split off and handed to a `speak(sentence)`
callback (the speech generator / TTS) on a background worker, so speech of sentence k overlaps
decoding of sentence k+1. A sentence ends at . ! ? (followed by whitespace: "3.5" and "e.g."
do not end one; abbreviations are configurable) or at CJK 。！？ (no space needed), after any
run of further terminators and closing quotes/brackets; optionally at a newline. Text with no
letter or digit ("...") or only a list number ("2.") is not a sentence of its own and joins the
next one. At the end the
final partial sentence is flushed. `espeak_tts` is a default `speak` (Debian espeak-ng, one wav
per sentence); OpenOmni's speech generator plugs into the same hook.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import threading
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from omni_jax.config_base import StrictConfig

DEFAULT_ABBREVIATIONS = ("mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "e.g", "i.e",
                         "cf", "fig", "approx", "etc", "u.s", "u.k")
_OPENERS = "\"'([{“‘«「『《【（"
_ENUMERATOR = re.compile(r"\d+[.)]")  # "1." of a numbered list is not a sentence
_CJK = re.compile(r"[\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")


@dataclasses.dataclass(frozen=True)
class SplitterConfig(StrictConfig):
    """Where sentences end (see the module docstring)."""

    terminators: str = ".!?"  # end a sentence when whitespace follows
    cjk_terminators: str = "。！？"  # end a sentence whatever follows
    closers: str = "\"')]}”’»」』》】）"  # belong to the sentence they follow
    abbreviations: tuple[str, ...] = DEFAULT_ABBREVIATIONS  # lower case, without the last "."
    newline_breaks: bool = True  # a newline ends a (non-empty) sentence too

    def __post_init__(self) -> None:
        if not self.terminators and not self.cjk_terminators:
            raise ValueError("SplitterConfig: give at least one terminator (terminators or "
                             "cjk_terminators)")
        for name in ("terminators", "cjk_terminators", "closers"):
            value = getattr(self, name)
            if not isinstance(value, str) or any(c.isspace() or c.isalnum() for c in value):
                raise ValueError(f"SplitterConfig.{name} must be a string of punctuation "
                                 f"characters, got {value!r}")
        if isinstance(self.abbreviations, str) or not all(
                isinstance(a, str) and a and a == a.lower() and not a.endswith(".")
                for a in self.abbreviations):
            raise ValueError(f"SplitterConfig.abbreviations must be lower-case words without "
                             f"the final '.', e.g. ('mr', 'e.g'), got {self.abbreviations!r}")
        object.__setattr__(self, "abbreviations", tuple(self.abbreviations))



def _abbreviation(text: str, start: int, dot: int, config: SplitterConfig) -> bool:
    """Is the word ending at text[dot] == "." a listed abbreviation ("Dr.", "e.g.")?"""
    word_start = dot
    while word_start > start and not text[word_start - 1].isspace():
        word_start -= 1
    word = text[word_start:dot].lstrip(_OPENERS).lower()
    return word in config.abbreviations


def split_sentences(text: str, config: SplitterConfig | None = None, *, final: bool = False
                    ) -> tuple[list[str], str]:
    """-> (complete sentences, stripped, in order; the rest of `text`, still open).

    final=False: a terminator at the very end of `text` is undecided (more text may follow:
    "3." + "5"), so it stays in the rest. final=True: the end of text ends a sentence too
    (the rest is then only text without a terminator; `SentenceSplitter.flush` emits it).
    """
    config = config or SplitterConfig()
    ends = config.terminators + config.cjk_terminators
    out: list[str] = []
    start = i = 0
    n = len(text)

    def close(end: int, nxt: int) -> None:
        nonlocal start
        sentence = text[start:end].strip()
        if any(c.isalnum() for c in sentence) and not _ENUMERATOR.fullmatch(sentence):
            out.append(sentence)
            start = nxt

    while i < n:
        ch = text[i]
        if ch == "\n" and config.newline_breaks:
            close(i, i + 1)
            i += 1
            continue
        if ch not in ends:
            i += 1
            continue
        j = i + 1
        while j < n and (text[j] in ends or text[j] in config.closers):
            j += 1
        if j == n and not final:
            break  # undecided until more text arrives
        run = text[i:j]
        if any(c in config.cjk_terminators for c in run) or j == n:
            close(j, j)
        elif text[j].isspace() and not (run.rstrip(config.closers) == "."
                                        and _abbreviation(text, start, i, config)):
            close(j, j)
        i = j
    return out, text[start:]


class SentenceSplitter:
    """Incremental splitter: feed text deltas, get the sentences they complete; flush at end."""

    def __init__(self, config: SplitterConfig | None = None) -> None:
        self.config = config or SplitterConfig()
        self.buffer = ""

    def feed(self, delta: str) -> list[str]:
        """Append decoded text; -> the sentences completed by it (maybe none)."""
        if not isinstance(delta, str):
            raise ValueError(f"SentenceSplitter.feed expects a str, got {type(delta).__name__}")
        self.buffer += delta
        out, self.buffer = split_sentences(self.buffer, self.config)
        return out

    def flush(self) -> list[str]:
        """End of text: the remaining sentences, including a final one without terminator."""
        out, rest = split_sentences(self.buffer, self.config, final=True)
        self.buffer = ""
        return out + ([rest.strip()] if rest.strip() else [])


class IncrementalDecoder:
    """Token ids -> text deltas: decodes the ids so far and returns the new suffix; holds back
    text ending in U+FFFD (a multi-byte character whose bytes have not all arrived)."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        return self._delta(final=False)

    def finish(self) -> str:
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        text = self.decode(self.ids)
        if (text.endswith("\ufffd") and not final) or len(text) <= len(self.text):
            return ""
        delta = text[len(self.text):]  # a changed prefix (rare re-merges) is not re-emitted
        self.text = text
        return delta


class SentenceTokens:
    """One row's tokens -> text deltas and sentences (as SentenceSplitter) plus each sentence's
    token span. A token belongs to the sentence holding its first non-space character; tokens
    without one (spaces, held-back bytes) go with the next token, trailing ones with the last
    sentence. A span is `sealed` (final) once a later token has text, or after `finish`."""

    def __init__(self, decode: Callable[[Sequence[int]], str],
                 config: SplitterConfig | None = None) -> None:
        self.detok, self.splitter = IncrementalDecoder(decode), SentenceSplitter(config)
        self.tokens: list[int] = []
        self.spans: list[list[Any]] = []  # [sentence, first token, end token (exclusive)]
        self.finished = False
        self._first: list[int] = []  # per token: offset of its first non-space char, or -1
        self._cursor = 0  # text offset where the next sentence is searched
        self._last_text = -1  # index of the last token with a non-space char

    def push(self, token: int) -> tuple[str, list[str]]:
        """Add a token -> (text delta, sentences it completed)."""
        before = len(self.detok.text)
        delta = self.detok.push(token)
        self.tokens.append(int(token))
        first = next((before + i for i, ch in enumerate(self.detok.text[before:])
                      if not ch.isspace()), -1)
        self._first.append(first)
        if first >= 0:
            self._last_text = len(self.tokens) - 1
        done = self.splitter.feed(delta) if delta else []
        self._close(done)
        return delta, done

    def finish(self) -> tuple[str, list[str]]:
        """End of the answer -> (last delta, remaining sentences); every span is then sealed."""
        delta = self.detok.finish()
        done = (self.splitter.feed(delta) if delta else []) + self.splitter.flush()
        self._close(done, final=True)
        if self.spans:  # trailing tokens without text join the last sentence
            self.spans[-1][2] = len(self.tokens)
        self.finished = True
        return delta, done

    def sealed(self) -> int:
        """How many leading spans are final."""
        if self.finished:
            return len(self.spans)
        return sum(1 for _, _, end in self.spans if end <= self._last_text)

    def _close(self, sentences: list[str], final: bool = False) -> None:
        text = self.detok.text
        start = self.spans[-1][2] if self.spans else 0
        for i, sentence in enumerate(sentences):
            at = text.find(sentence, self._cursor)
            end_char = len(text) if at < 0 else at + len(sentence)
            self._cursor = end_char
            stop = start
            if final and i == len(sentences) - 1:
                stop = len(self.tokens)
            else:
                for j in range(start, len(self.tokens)):
                    if self._first[j] >= end_char:
                        break
                    if self._first[j] >= 0:
                        stop = j + 1
            self.spans.append([sentence, start, stop])
            start = stop


def stream_text(tokens: Iterable[int], decode: Callable[[Sequence[int]], str], *,
                eos_id: int | Collection[int] | None = None,
                speak: Callable[[str], Any] | None = None,
                splitter: SentenceSplitter | None = None, background: bool = True
                ) -> Iterator[tuple[str, list[str]]]:
    """One row's token stream -> yields (text_delta, completed_sentences) per token.

    Stops at eos_id (one id or several; not decoded). Every sentence goes to `speak` exactly
    once, in order: on one background worker thread (background=True: decoding continues
    meanwhile) or inline. The final partial sentence is flushed as a last ("", [sentence])
    item. Speech still running when the stream ends is awaited (also when the consumer stops
    early); an exception raised by `speak` is re-raised then.
    """
    if splitter is None:
        splitter = SentenceSplitter()
    if speak is not None and not callable(speak):
        raise ValueError(f"stream_text: speak must be callable, got {type(speak).__name__}")
    stops = set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)
    detok = IncrementalDecoder(decode)
    pool = ThreadPoolExecutor(1, "speak") if speak is not None and background else None
    pending: list[Future] = []

    def say(sentences: list[str]) -> None:
        for s in sentences:
            if pool is not None:
                pending.append(pool.submit(speak, s))
            elif speak is not None:
                speak(s)

    try:
        for tok in tokens:
            if int(tok) in stops:
                break
            delta = detok.push(tok)
            done = splitter.feed(delta) if delta else []
            say(done)
            yield delta, done
        delta = detok.finish()
        last = splitter.feed(delta) + splitter.flush()
        say(last)
        if delta or last:
            yield delta, last
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
            for f in pending:
                f.result()  # re-raise a failed speak


# ---- default speech: espeak-ng ------------------------------------------------------------------
class EspeakTTS:
    """speak(sentence) -> path of out_dir/sentence_NNN.wav written by espeak-ng (NNN counts
    from 0 in call order), or None (with one warning) when espeak-ng is not installed."""

    def __init__(self, out_dir: str | os.PathLike, voice: str | None = None,
                 exe: str | None = None) -> None:
        if voice is not None and (not isinstance(voice, str) or not voice):
            raise ValueError(f"espeak_tts: voice must be an espeak-ng voice name or None "
                             f"(auto: 'cmn' for CJK text, else 'en'), got {voice!r}")
        self.out_dir, self.voice = os.fspath(out_dir), voice
        self.exe = exe or shutil.which("espeak-ng")
        self.paths: list[str] = []
        self._lock = threading.Lock()
        self._warned = False
        if self.exe is not None:
            os.makedirs(self.out_dir, exist_ok=True)

    def __call__(self, sentence: str) -> str | None:
        if self.exe is None:
            if not self._warned:
                warnings.warn("espeak-ng is not installed (apt-get install espeak-ng): "
                              "sentences are not spoken", stacklevel=2)
                self._warned = True
            return None
        voice = self.voice or ("cmn" if _CJK.search(sentence) else "en")
        with self._lock:
            path = os.path.join(self.out_dir, f"sentence_{len(self.paths):03d}.wav")
            self.paths.append(path)
        res = subprocess.run([self.exe, "-v", voice, "-w", path, "--stdin"], input=sentence,
                             capture_output=True, text=True, timeout=60, check=False)
        if res.returncode != 0 or not os.path.isfile(path):
            raise RuntimeError(f"espeak-ng failed on {sentence!r} (voice {voice}): "
                               f"{res.stderr.strip()}")
        return path


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def espeak_tts(out_dir: str | os.PathLike, voice: str | None = None) -> EspeakTTS:
    """The default `speak` callback: one wav per sentence under out_dir (see EspeakTTS)."""
    return EspeakTTS(out_dir, voice)
