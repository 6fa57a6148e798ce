"""Sentence-wise streaming: the splitter on tricky text, speak() once per sentence in order
while tokens stream, UTF-8 hold-back, the espeak-ng callback writes valid wavs."""

import threading
import time
import warnings

import numpy as np
import pytest
import soundfile as sf

from omni_jax.infer import stream
from omni_jax.infer.stream import (
    EspeakTTS,
    SentenceSplitter,
    SplitterConfig,
    espeak_available,
    espeak_tts,
    split_sentences,
    stream_text,
)

CASES = [
    ("Pi is about 3.14. It never ends!", ["Pi is about 3.14.", "It never ends!"]),
    ("Dr. Smith met Mr. Jones, e.g. at noon. Then they left.",
     ["Dr. Smith met Mr. Jones, e.g. at noon.", "Then they left."]),
    ('He said "Stop!" Then he ran. (It was late.) Done',
     ['He said "Stop!"', "Then he ran.", "(It was late.)", "Done"]),
    ("Really?! Yes... maybe. Ok", ["Really?!", "Yes...", "maybe.", "Ok"]),
    ("... and so on. End", ["... and so on.", "End"]),
    ("version 2.0 is out.Really", ["version 2.0 is out.Really"]),
    ("Steps:\n1. Mix it.\n2. Bake it.", ["Steps:", "1. Mix it.", "2. Bake it."]),
    ("The U.S. team won. Great", ["The U.S. team won.", "Great"]),
    ("你好。今天天气很好！你呢？好的", ["你好。", "今天天气很好！", "你呢？", "好的"]),
    ("他说：“走吧。”然后离开了。", ["他说：“走吧。”", "然后离开了。"]),
    ("It is 3.5 km. 很远！ Ok?", ["It is 3.5 km.", "很远！", "Ok?"]),
]


@pytest.mark.parametrize("text,want", CASES)
def test_splitter_tricky_strings(text, want):
    whole = SentenceSplitter()
    assert whole.feed(text) + whole.flush() == want
    by_char = SentenceSplitter()  # streaming one character at a time: the same sentences
    got = [s for ch in text for s in by_char.feed(ch)] + by_char.flush()
    assert got == want


def test_undecided_end_waits_for_more_text():
    sp = SentenceSplitter()
    assert sp.feed("It costs 3.") == []  # "3." could become "3.5"
    assert sp.feed("5 dollars. Ok") == ["It costs 3.5 dollars."]
    assert sp.buffer == " Ok"
    assert sp.feed("") == [] and sp.flush() == ["Ok"] and sp.flush() == []
    assert split_sentences("Hi there. Bye", final=False) == (["Hi there."], " Bye")
    assert split_sentences("Wait!", final=False) == ([], "Wait!")
    assert split_sentences("Wait!", final=True) == (["Wait!"], "")


def test_configurable_abbreviations_and_newlines():
    text = "Dr. Who. Approx. ten\nlines"
    assert split_sentences(text, final=True) == (["Dr. Who.", "Approx. ten"], "lines")
    cfg = SplitterConfig(abbreviations=("who",), newline_breaks=False)
    assert split_sentences(text, cfg, final=True) == (["Dr.", "Who. Approx."], " ten\nlines")
    assert SplitterConfig.from_dict({"abbreviations": ["no"]}).abbreviations == ("no",)


def pieces_tokenizer(text: str):
    """Byte-level toy tokenizer: 3-byte pieces (so some pieces split a UTF-8 character)."""
    data = text.encode()
    vocab = [data[i:i + 3] for i in range(0, len(data), 3)] + [b"<eos>", b" junk."]
    decode = lambda ids: b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")
    return list(range(len(vocab) - 2)), decode, len(vocab) - 2


def test_stream_speaks_each_sentence_once_in_order_while_decoding():
    text = "Hello there. The café is open! Is it 3.5 km? 好的。Final words"
    ids, decode, eos = pieces_tokenizer(text)
    spoken, threads = [], set()
    main = threading.current_thread()
    speaking_started = threading.Event()

    def speak(sentence):
        speaking_started.set()
        threads.add(threading.current_thread() is main)
        time.sleep(0.02)  # a slow TTS: decoding must not wait for it
        spoken.append(sentence)

    def tokens():  # EOS, then tokens that must never be decoded
        yield from ids
        yield eos
        yield eos + 1

    deltas, yielded = [], []
    for delta, sentences in stream_text(tokens(), decode, eos_id=eos, speak=speak):
        assert "\ufffd" not in delta  # a split multi-byte character is held back
        deltas.append(delta)
        yielded += sentences
    want = ["Hello there.", "The café is open!", "Is it 3.5 km?", "好的。", "Final words"]
    assert yielded == want and spoken == want  # each once, in order, final one flushed
    assert "".join(deltas) == text
    assert threads == {False}  # spoken on the worker thread
    assert deltas[-1] == "" and len(deltas) == len(ids) + 1  # last item: the flush


def test_speak_errors_surface_and_inline_mode():
    ids, decode, eos = pieces_tokenizer("One. Two. Three")
    got = []
    list(stream_text(ids, decode, speak=got.append, background=False))
    assert got == ["One.", "Two.", "Three"]
    got = []  # several stop ids: the first one met ends the stream (pieces: "One", ". T", ...)
    list(stream_text(ids, decode, eos_id={eos, 2}, speak=got.append, background=False))
    assert got == ["One.", "T"]

    def broken(sentence):
        raise RuntimeError(f"tts down at {sentence}")

    with pytest.raises(RuntimeError, match="tts down at One."):
        list(stream_text(ids, decode, speak=broken))
    with pytest.raises(ValueError, match="speak must be callable"):
        list(stream_text(ids, decode, speak="espeak"))
    with pytest.raises(ValueError, match="feed expects a str"):
        SentenceSplitter().feed(b"bytes")
    with pytest.raises(ValueError, match="abbreviations must be lower-case words without"):
        SplitterConfig(abbreviations=("Dr.",))
    with pytest.raises(ValueError, match="closers must be a string of punctuation"):
        SplitterConfig(closers="a")
    with pytest.raises(ValueError, match="unknown keys \\['abbrevs'\\]"):
        SplitterConfig.from_dict({"abbrevs": ()})


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
def test_espeak_writes_one_valid_wav_per_sentence(tmp_path):
    speak = espeak_tts(tmp_path / "speech")
    ids, decode, _ = pieces_tokenizer("Good morning. 你好。")
    list(stream_text(ids, decode, speak=speak))
    assert [p.rsplit("/", 1)[1] for p in speak.paths] == ["sentence_000.wav",
                                                          "sentence_001.wav"]
    for path in speak.paths:
        wave, rate = sf.read(path)
        assert rate == 22050 and wave.ndim == 1
        assert 0.2 < len(wave) / rate < 5 and np.abs(wave).max() > 0.01


def test_espeak_missing_skips_cleanly(tmp_path, monkeypatch):
    monkeypatch.setattr(stream.shutil, "which", lambda name: None)
    speak = EspeakTTS(tmp_path / "none")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert speak("Hello.") is None and speak("Again.") is None
    assert len(caught) == 1 and "espeak-ng is not installed" in str(caught[0].message)
    assert not (tmp_path / "none").exists()
    with pytest.raises(ValueError, match="voice must be an espeak-ng voice name"):
        espeak_tts(tmp_path, voice="")


def test_sentence_tokens_spans():
    pieces = ["Hi", " there", ".", " ", "Next", " one", ". T", "wo", " ", "..."]
    tr = stream.SentenceTokens(lambda ids: "".join(pieces[i] for i in ids))
    sealed = []
    for i in range(len(pieces)):
        tr.push(i)
        sealed.append(tr.sealed())
    assert tr.finish() == ("", ["Two ..."])
    # a token goes with the sentence of its first non-space char; spaces with the next token
    assert tr.spans == [["Hi there.", 0, 3], ["Next one.", 3, 7], ["Two ...", 7, 10]]
    assert sealed == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2] and tr.sealed() == 3
    # the last sentence's text sits in the previous sentence's token: it keeps the trailing space
    tr = stream.SentenceTokens(lambda ids: "".join(["A", " b", ". C", " "][i] for i in ids))
    for i in range(4):
        tr.push(i)
    assert tr.finish()[1] == ["C"] and tr.spans == [["A b.", 0, 3], ["C", 3, 4]]
    tr = stream.SentenceTokens(lambda ids: "".join(["Ok", ".", " ", " "][i] for i in ids))
    for i in range(4):
        tr.push(i)
    assert tr.finish() == ("", []) and tr.spans == [["Ok.", 0, 4]]  # trailing spaces join it
