"""Speech out at inference on a tiny omni model + tiny generators (random weights): streamed
sentence audio (states from the KV-cached decode) equals the non-streamed run (one full
forward, the training framing), arrives before the text ends and interleaves with it; the
decoded tokens are generate_omni's; the AR generator streams the same; bad input errors."""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.configs.models import tiny as tiny_model  # noqa: E402
from omni_jax.infer.generate import SamplingConfig
from omni_jax.infer.omni import collate_prompts, generate_omni
from omni_jax.infer.speech import (
    AudioChunk,
    SpeechOut,
    TextDelta,
    speak_sentences,
    stream_speech,
)
from omni_jax.infer.stream import SentenceSplitter
from omni_jax.model import OmniModel, tokens_per_item
from omni_jax.omni_config import MODALITY_CODE, OmniConfig
from omni_jax.speech.config import speech_preset
from omni_jax.speech.generator import SpeechGenerator
from omni_jax.speech.vocoder import MelTableVocoder, VocoderConfig
from omni_jax.train.omni_model import OmniLM

IM_END, NL, STOP2 = 5, 6, 4  # toy ids of <|im_end|>, "\n", <|endoftext|>
HEADER = [3, 7, 6]  # <|im_start|> assistant \n
WORDS = ["Hello", " there", ".", " The", " cafe", " is", " open", "!", " Is", " it", " far",
         "?", " Final", " words"]
PIECES = {100 + i: w for i, w in enumerate(WORDS)}
SCRIPTS = [[100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113],
           [103, 104, 105, 106, 107, 112, 113, 102]]  # row 1: 2 sentences


def decode(ids):
    return "".join(PIECES.get(int(i), f" w{int(i)}") for i in ids)


@pytest.fixture(scope="module")
def setup():
    d = tiny_model.get_config("mlp").to_dict()
    d["llm"].update(initializer_range=0.3, max_position_embeddings=256)
    del d["video"], d["audio"]
    config = OmniConfig.from_dict(d)
    params = nn.unbox(jax.jit(lambda: OmniLM(config).init(
        jax.random.key(0), {"input_ids": jnp.zeros((1, 8), jnp.int32)}))())["params"]
    model = OmniModel(config)
    rng = np.random.default_rng(0)
    k = tokens_per_item(config, "image")
    ids0 = np.r_[rng.integers(8, 90, 2), np.full(k, 7), rng.integers(8, 90, 3), HEADER]
    mod0 = np.r_[np.zeros(2), np.full(k, MODALITY_CODE["image"]), np.zeros(6)].astype(np.int32)
    prompts = [{"input_ids": ids0[None].astype(np.int32), "modality": mod0[None],
                "image": rng.normal(size=(1, 32, 32, 3)).astype(np.float32)},
               {"input_ids": np.r_[rng.integers(8, 90, 4), HEADER][None].astype(np.int32),
                "modality": np.zeros((1, 7), np.int32)}]
    table = rng.uniform(-0.5, 0.5, (40, 80)).astype(np.float32)
    vocoder = MelTableVocoder(table, np.ones(40, np.int64), VocoderConfig(n_iter=4), 16000, 25)
    return model, {"params": params}, prompts, vocoder


def generator(mode, seed=1):
    cfg = speech_preset("tiny", 32, mode, text_vocab=512, upsample=3, unit_vocab=40)
    dummy = (jnp.zeros((1, 4, 32)), jnp.ones((1, 4), bool), jnp.ones((1, 2), jnp.int32),
             jnp.ones((1, 2), bool))
    params = nn.unbox(jax.jit(SpeechGenerator(cfg).init)(jax.random.key(seed), *dummy))
    return cfg, params["params"]


def speech_out(setup, mode="ctc"):
    cfg, params = generator(mode)
    return SpeechOut(cfg, params, setup[3], header_len=len(HEADER), footer_ids=(IM_END, NL))


def forced(scripts):
    out = np.full((len(scripts), max(map(len, scripts)) + 1), IM_END, np.int32)
    for i, s in enumerate(scripts):
        out[i, :len(s)] = s
    return out


def run(setup, speech, **kw):
    model, variables, prompts, _ = setup
    batch = collate_prompts(prompts, pad_id=0)
    events, times = [], []
    t0 = time.perf_counter()
    for ev in stream_speech(model, variables, batch, speech, decode, max_new_tokens=None,
                            eos_id=(IM_END, STOP2), forced_tokens=forced(SCRIPTS), **kw):
        events.append(ev)
        times.append(time.perf_counter() - t0)
        if kw.get("background") and isinstance(ev, TextDelta):
            time.sleep(0.05)  # a consumer that plays the text: the worker keeps speaking
    return events, times


def check_stream(setup, speech, events, times, inline):
    model, variables, prompts, _ = setup
    for row, script in enumerate(SCRIPTS):
        deltas = [e for e in events if isinstance(e, TextDelta) and e.row == row]
        chunks = [e for e in events if isinstance(e, AudioChunk) and e.row == row]
        sp = SentenceSplitter()
        want = sp.feed(decode(script)) + sp.flush()
        assert "".join(e.text for e in deltas) == decode(script)
        assert [s for e in deltas for s in e.sentences] == want
        assert [c.sentence for c in chunks] == want and [c.index for c in chunks] == list(
            range(len(want)))
        assert [t for c in chunks for t in c.token_ids] == script
        ref = speak_sentences(model, variables, prompts[row], speech,
                              [c.token_ids for c in chunks], texts=want)
        for c, r in zip(chunks, ref):
            assert len(c.units) > 0 and c.wav.dtype == np.float32
            np.testing.assert_array_equal(c.units, r.units)
            np.testing.assert_array_equal(c.wav, r.wav)
            assert len(c.wav) == len(c.units) * 16000 // 25
        kinds = [type(e).__name__ for e in events if e.row == row]
        first_audio = kinds.index("AudioChunk")
        last_text = len(kinds) - 1 - kinds[::-1].index("TextDelta")
        if inline:  # deterministic: audio of sentence 1 before the row's text is done
            assert first_audio < last_text and kinds[-1] == "AudioChunk"
    kinds = [type(e).__name__ for e in events]
    i_audio = kinds.index("AudioChunk")
    i_text = len(kinds) - 1 - kinds[::-1].index("TextDelta")
    print(f"first AudioChunk: event {i_audio} at {times[i_audio]:.3f} s; last TextDelta: "
          f"event {i_text} at {times[i_text]:.3f} s; {len(events)} events")
    assert times[i_audio] < times[i_text]
    return [e for e in events if isinstance(e, AudioChunk)]


def test_streamed_speech_equals_non_streamed(setup):
    speech = speech_out(setup)
    inline = check_stream(setup, speech, *run(setup, speech, background=False), True)
    # inline: each sentence is spoken right when its span is final and its states exist
    events, times = run(setup, speech, background=True)
    threaded = check_stream(setup, speech, events, times, False)
    key = lambda c: (c.row, c.index)  # noqa: E731
    for a, b in zip(sorted(inline, key=key), sorted(threaded, key=key)):
        assert key(a) == key(b) and np.array_equal(a.wav, b.wav)
    assert len(inline) == len(threaded) == 6  # 4 + 2 sentences
    # a whole answer as one sentence: the training framing (header + answer + footer)
    model, variables, prompts, _ = setup
    (whole,) = speak_sentences(model, variables, prompts[1], speech, [SCRIPTS[1]])
    assert len(whole.units) > 0 and len(whole.wav) == len(whole.units) * 640


def test_sampled_tokens_equal_generate_omni(setup):
    model, variables, prompts, _ = setup
    speech = speech_out(setup)
    batch = collate_prompts(prompts, pad_id=0)
    sampling = SamplingConfig(greedy=False, temperature=1.0, top_k=50)
    kw = dict(max_new_tokens=15, eos_id=(IM_END, STOP2), sampling=sampling,
              rng=jax.random.key(4))
    want = np.asarray(generate_omni(model, variables, batch, **kw))
    events = list(stream_speech(model, variables, batch, speech, decode, background=False, **kw))
    for row in range(2):
        ids = want[row]
        end = np.isin(ids, (IM_END, STOP2))
        ids = ids[:np.argmax(end)] if end.any() else ids
        text = "".join(e.text for e in events if isinstance(e, TextDelta) and e.row == row)
        chunks = [e for e in events if isinstance(e, AudioChunk) and e.row == row]
        assert text == decode(ids) and len(ids) > 0
        assert [t for c in chunks for t in c.token_ids] == ids.tolist()


def test_ar_generator_streams_the_same(setup):
    model, variables, prompts, _ = setup
    speech = speech_out(setup, "ar")
    events = list(stream_speech(model, variables, {k: v for k, v in prompts[1].items()},
                                speech, decode, max_new_tokens=None, eos_id=IM_END,
                                forced_tokens=forced(SCRIPTS[1:]), background=False,
                                speech_rng=jax.random.key(7)))
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    ref = speak_sentences(model, variables, prompts[1], speech, [c.token_ids for c in chunks],
                          speech_rng=jax.random.key(7))
    assert len(chunks) == 2 and all(len(c.units) > 0 for c in chunks)
    for c, r in zip(chunks, ref):
        np.testing.assert_array_equal(c.units, r.units)
        np.testing.assert_array_equal(c.wav, r.wav)


def test_bad_input(setup):
    model, variables, prompts, vocoder = setup
    cfg, params = generator("ctc")
    with pytest.raises(ValueError, match="a vocoder .* is needed"):
        SpeechOut(cfg, params, None, header_len=3, footer_ids=(IM_END, NL))
    small = MelTableVocoder(vocoder.table[:10], vocoder.counts[:10], vocoder.config, 16000, 25)
    with pytest.raises(ValueError, match="emits units \\[0, 40\\) but the vocoder knows only 10"):
        SpeechOut(cfg, params, small, header_len=3, footer_ids=(IM_END, NL))
    speech = SpeechOut(cfg, params, vocoder, header_len=3, footer_ids=(IM_END, NL))
    with pytest.raises(ValueError, match="a sentence has empty text"):
        speech.speak(np.zeros((4, 32)), np.ones(4, bool), np.zeros((0,), np.int32))
    with pytest.raises(ValueError, match="a sentence has empty text"):
        speech.speak_rows([np.zeros((4, 32))], [[]])
    with pytest.raises(ValueError, match="give non-empty sentences"):
        speak_sentences(model, variables, prompts[1], speech, [[100], []])
    with pytest.raises(ValueError, match="hidden must be"):
        speech.speak(np.zeros((4, 31)), np.ones(4, bool), np.ones(2, np.int32))
    head = params["llm_decoder"]  # all frames blank: no units, an empty wav (no crash)
    mute = SpeechOut(cfg, {**params, "llm_decoder": {**head, "bias": head["bias"].at[-1].add(
        1e3)}}, vocoder, header_len=3, footer_ids=(IM_END, NL))
    units, wav = mute.speak(np.ones((4, 32)), np.ones(4, bool), np.ones(3, np.int32))
    assert units.shape == (0,) and wav.shape == (0,) and wav.dtype == np.float32
    short = {"input_ids": np.array([[3, 7]], np.int32)}
    with pytest.raises(ValueError, match="shorter than the assistant header"):
        stream_speech(model, variables, short, speech, decode, max_new_tokens=4, eos_id=IM_END)
    with pytest.raises(ValueError, match="forced_tokens must be int"):
        stream_speech(model, variables, prompts[1], speech, decode, max_new_tokens=4,
                      eos_id=IM_END, forced_tokens=np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="speech must be a SpeechOut"):
        stream_speech(model, variables, prompts[1], None, decode, max_new_tokens=4,
                      eos_id=IM_END)
