"""MelTableVocoder: units of held-out espeak-ng speech -> audio of the right length whose log-mel
matches the original (and not another utterance / shuffled units); save/load; bad input."""

import json

import numpy as np
import pytest
import soundfile as sf

from omni_jax.data.features.audio import log_mel
from omni_jax.infer.stream import EspeakTTS, espeak_available
from omni_jax.speech.units import UnitConfig, UnitTokenizer, prepare_waveform
from omni_jax.speech.vocoder import MelTableVocoder, Vocoder, VocoderConfig

SR = 16000
TEXTS = ("the quick brown fox jumps over the lazy dog", "speech units are discrete tokens",
         "omni modal models hear and see", "a vocoder turns units into sound")
VOICES = ("en", "en-us")
pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tokenizer k=64, vocoder, {(voice, text): 16 kHz waveform}); the last text is held out."""
    speech = {}
    for voice in VOICES:
        tts = EspeakTTS(tmp_path_factory.mktemp(voice.replace("-", "_")), voice=voice)
        for text in TEXTS:
            w, sr = sf.read(tts(text), dtype="float32")
            speech[(voice, text)] = prepare_waveform(w, sr, SR)
    train = [speech[(v, t)] for v in VOICES for t in TEXTS[:3]]
    tok = UnitTokenizer.fit(train, UnitConfig(vocab_size=64, kmeans_iters=30))
    return tok, MelTableVocoder.fit(tok, train), speech


def distance(vocoder, a, b):
    """Mean |log-mel(a) - log-mel(b)| over the common frames (Whisper log10 / 4 scale)."""
    ma, mb = log_mel(a, vocoder.audio), log_mel(b, vocoder.audio)
    t = min(ma.shape[1], mb.shape[1])
    return float(np.abs(ma[:, :t] - mb[:, :t]).mean())


@pytest.mark.filterwarnings("ignore:n_fft=1024 is too large")  # the 1-unit (320 sample) call
def test_vocoded_audio_length_and_level(setup):
    tok, voc, speech = setup
    assert isinstance(voc, Vocoder) and voc.sample_rate == SR and voc.hop_length == 320
    wav = speech[("en", TEXTS[3])]
    units = tok.encode(wav, SR)
    audio = voc(units)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == len(units) * voc.hop_length  # exactly frames / frame_rate seconds
    assert abs(len(audio) - len(wav)) < voc.hop_length
    assert np.isfinite(audio).all() and np.abs(audio).max() < 1.5
    rms, ref = np.sqrt(np.mean(audio ** 2)), np.sqrt(np.mean(wav ** 2))
    assert 0.3 * ref < rms < 1.5 * ref  # measured 0.057 vs 0.091 (en)
    np.testing.assert_array_equal(voc(units), audio)  # Griffin-Lim phase init is seeded
    assert len(voc(units[:1])) == 320


def test_vocoded_audio_resembles_the_utterance(setup):
    tok, voc, speech = setup
    for voice in VOICES:
        target = speech[(voice, TEXTS[3])]
        units = tok.encode(target, SR)
        audio = voc(units)
        own = distance(voc, audio, target)
        other = distance(voc, audio, speech[(voice, TEXTS[0])])
        shuffled = distance(voc, voc(np.random.default_rng(0).permutation(units)), target)
        # measured own 0.130 / 0.127 (en / en-us), other utterance 0.431 / 0.431,
        # shuffled units 0.374 / 0.383
        assert own < 0.18, (voice, own)
        assert own + 0.2 < min(other, shuffled), (voice, own, other, shuffled)


def test_table_counts_and_unseen_units(setup):
    tok, voc, speech = setup
    train = [speech[(v, t)] for v in VOICES for t in TEXTS[:3]]
    assert voc.table.shape == (64, 80)
    assert voc.counts.sum() == sum(len(w) // 320 for w in train)
    seen = np.bincount(np.concatenate([tok.encode(w, SR) for w in train]), minlength=64) > 0
    np.testing.assert_array_equal(voc.counts > 0, seen)
    # a unit nobody used takes the global mean frame
    refit = MelTableVocoder.fit(tok, train[:1])
    unseen = refit.counts == 0
    assert unseen.any()
    mean = log_mel(train[0], refit.audio).mean(1)
    np.testing.assert_allclose(refit.table[unseen], np.broadcast_to(mean, (unseen.sum(), 80)),
                               atol=1e-5)
    smooth = voc.mel(np.array([0, 0, 0, 63, 63, 63]))
    raw = MelTableVocoder(voc.table, voc.counts, voc.config.replace(smoothing=0), SR, 50)
    np.testing.assert_array_equal(raw.mel(np.array([7, 9])), voc.table[[7, 9]].T)
    np.testing.assert_allclose(smooth[:, 2], (2 * voc.table[0] + voc.table[63]) / 3, atol=1e-6)


def test_save_load_with_tokenizer(setup, tmp_path):
    tok, voc, speech = setup
    tok.save(tmp_path)
    voc.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["units.json", "units.npz",
                                                         "vocoder.json", "vocoder.npz"]
    loaded = MelTableVocoder.load(tmp_path)
    units = UnitTokenizer.load(tmp_path).encode(speech[("en", TEXTS[3])], SR)
    np.testing.assert_array_equal(loaded(units), voc(units))
    assert loaded.config == voc.config
    # equal fingerprints voice equally (eval caches by it); another table or setting differs
    assert loaded.fingerprint == voc.fingerprint and len(voc.fingerprint) == 64
    table = voc.table.copy()
    table[0, 0] += 1e-3
    assert MelTableVocoder(table, voc.counts, voc.config, voc.sample_rate,
                           voc.frame_rate).fingerprint != voc.fingerprint
    assert MelTableVocoder(voc.table, voc.counts, voc.config.replace(n_iter=8), voc.sample_rate,
                           voc.frame_rate).fingerprint != voc.fingerprint
    other = UnitTokenizer(tok.config.replace(vocab_size=8), tok.centroids[:8], tok.mean, tok.std)
    other.save(tmp_path)  # a different tokenizer in the same directory
    with pytest.raises(ValueError, match="!= the tokenizer's \\(8, 16000, 50\\)"):
        MelTableVocoder.load(tmp_path)


def test_bad_input(setup, tmp_path):
    tok, voc, _ = setup
    with pytest.raises(ValueError, match="empty unit sequence"):
        voc(np.array([], np.int32))
    with pytest.raises(ValueError, match="unit 64 outside the vocab \\[0, 64\\)"):
        voc(np.array([3, 64, 2]))
    with pytest.raises(ValueError, match="unit -1 outside the vocab"):
        voc(np.array([-1]))
    with pytest.raises(ValueError, match="must be integers"):
        voc(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="must be 1-D"):
        voc(np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="hop_length=256 must equal sample_rate / frame_rate"):
        MelTableVocoder.fit(tok, [np.zeros(SR, np.float32)], VocoderConfig(hop_length=256))
    with pytest.raises(ValueError, match="empty waveform"):
        MelTableVocoder.fit(tok, [np.zeros(0, np.float32)])
    with pytest.raises(ValueError, match="momentum must be in"):
        VocoderConfig(momentum=1.0)
    with pytest.raises(ValueError, match="missing vocoder.json"):
        MelTableVocoder.load(tmp_path)
    voc.save(tmp_path)
    (tmp_path / "vocoder.npz").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="cannot read vocoder.json / vocoder.npz"):
        MelTableVocoder.load(tmp_path)
    np.savez(tmp_path / "vocoder.npz", table=voc.table[:10], counts=voc.counts[:10])
    with pytest.raises(ValueError, match="table \\(10, 80\\) does not match vocab_size=64"):
        MelTableVocoder.load(tmp_path)
    meta = json.loads((tmp_path / "vocoder.json").read_text())
    (tmp_path / "vocoder.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(ValueError, match="format 'other' is not"):
        MelTableVocoder.load(tmp_path)


def test_vocode_many_in_processes_equals_one_by_one(setup, monkeypatch):
    """vocode_many over 2 spawned workers: every clip bit-identical to the vocoder's own call
    (single-threaded BLAS), in order, empty units -> empty audio; too few clips are voiced in
    this process, to the same bits."""
    from threadpoolctl import threadpool_limits

    from omni_jax.speech import vocode_pool as P

    tok, voc, speech = setup
    units = [tok.encode(w, SR) for w in speech.values()]
    rng = np.random.default_rng(0)
    clips = [u[rng.integers(0, len(u) // 2):][:rng.integers(5, 40)] for u in units * 5]
    clips[3] = clips[3][:0]
    assert len(clips) >= 2 * P.MIN_PER_WORKER
    monkeypatch.setattr(P, "spawn_safe", lambda: True)  # whatever started pytest
    wavs = P.vocode_many(voc, clips, workers=2)
    assert P._POOL["executor"] is not None  # it ran in the pool
    assert len(wavs) == len(clips) and wavs[3].size == 0 and wavs[3].dtype == np.float32
    with threadpool_limits(1):
        for u, w in zip(clips, wavs):
            if u.size:
                np.testing.assert_array_equal(w, voc(u))
    P._shutdown()
    few = P.vocode_many(voc, clips[:P.MIN_PER_WORKER], workers=2)  # below 2 x MIN: here
    assert P._POOL["executor"] is None and all(
        np.array_equal(a, b) for a, b in zip(few, wavs[:P.MIN_PER_WORKER]))
    with pytest.raises(ValueError, match="workers"):
        P.vocode_many(voc, clips, workers=0)


def test_workers_spawn_only_where_the_main_module_is_safe_to_import(monkeypatch):
    import sys
    import types

    from omni_jax.speech import vocode_pool as P

    def main(file=None, spec=None):
        m = types.ModuleType("__main__")
        if file:
            m.__file__ = file
        m.__spec__ = None if spec is None else types.SimpleNamespace(name=spec)
        monkeypatch.setitem(sys.modules, "__main__", m)
        return P.spawn_safe()

    assert main("/x/omni_jax/cli/demo.py", "omni_jax.cli.demo")  # python -m ...
    assert main()  # interactive
    assert not main("/home/u/script.py")  # a script: perhaps unguarded
    assert not main("<stdin>")


def test_pool_is_kept_only_for_the_same_vocoder(monkeypatch):
    """A started pool voices with its vocoder: reused for the same fingerprint (or, without
    one, the same object), restarted for another vocoder or worker count."""
    import types

    from omni_jax.speech import vocode_pool as P

    started = []

    class Executor:
        def __init__(self, workers, mp_context, initializer, initargs):
            started.append((workers, initargs[0]))

        def shutdown(self, wait, cancel_futures):
            pass

    monkeypatch.setattr(P.concurrent.futures, "ProcessPoolExecutor", Executor)
    monkeypatch.setitem(P._POOL, "key", None)
    monkeypatch.setitem(P._POOL, "executor", None)
    plain, other = (lambda u: u), (lambda u: u)
    named = [types.SimpleNamespace(fingerprint="f") for _ in range(2)]
    for v, w in ((plain, 2), (plain, 2), (other, 2), (other, 3), (named[0], 2), (named[1], 2)):
        P._executor(v, w)
    assert started == [(2, plain), (2, other), (3, other), (2, named[0])]
    P._shutdown()
