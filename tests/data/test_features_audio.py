"""Whisper log-mel parity with transformers' WhisperFeatureExtractor; decoding and errors."""

import io
import os
import shutil
import subprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import librosa  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402
from transformers import WhisperFeatureExtractor  # noqa: E402
from transformers.audio_utils import mel_filter_bank  # noqa: E402

from omni_jax.data.features.audio import (  # noqa: E402
    chunk_waveform,
    decode_audio,
    log_mel,
    log_mel_batch,
    mel_filters,
    resample,
    to_float_waveform,
)
from omni_jax.data.features.config import AudioConfig  # noqa: E402

SR = 16000
TOL = 1e-3  # log-mel units (the bound); we measure ~3e-5


@pytest.fixture(scope="module")
def clips():
    rng = np.random.default_rng(0)
    t = np.arange(int(SR * 6.3)) / SR
    sine = (0.4 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    noise = (0.1 * rng.standard_normal(SR * 4 + 77)).astype(np.float32)
    return {"sine": sine, "noise": noise}


@pytest.fixture(scope="module", params=[80, 128])
def fe(request):
    return WhisperFeatureExtractor(feature_size=request.param), AudioConfig(n_mels=request.param)


def _wav_bytes(data, sr, subtype="PCM_16", fmt="WAV"):
    buf = io.BytesIO()
    sf.write(buf, data, sr, subtype=subtype, format=fmt)
    return buf.getvalue()


def test_mel_filters_match_transformers(fe):
    _, cfg = fe
    ref = mel_filter_bank(num_frequency_bins=201, num_mel_filters=cfg.n_mels, min_frequency=0.0,
                          max_frequency=8000.0, sampling_rate=SR, norm="slaney",
                          mel_scale="slaney")
    np.testing.assert_allclose(mel_filters(cfg), ref, atol=1e-12)


def test_padded_30s_parity(fe, clips):
    ext, cfg = fe
    long = np.concatenate([clips["noise"]] * 8)[: SR * 31]  # 31 s: truncated to 30 s
    for w in (clips["sine"], clips["noise"], long):
        ref = ext(w, sampling_rate=SR, return_tensors="np")["input_features"][0]
        ours = log_mel(w, cfg)
        assert ours.shape == (cfg.n_mels, 3000) == ref.shape
        assert ours.dtype == np.float32
        assert np.abs(ours - ref).max() <= TOL


def test_numpy_path_parity(fe, clips):
    """transformers' float64 NumPy path (audio_utils.spectrogram), not only its torch path."""
    ext, cfg = fe
    w = clips["sine"]
    padded = np.zeros((1, cfg.n_samples), np.float32)
    padded[0, : w.size] = w
    ref = ext._np_extract_fbank_features(padded, "cpu")[0]
    assert np.abs(log_mel(w, cfg) - ref).max() <= TOL


def test_variable_length_batch_and_mask(fe, clips):
    ext, cfg = fe
    cfg = cfg.replace(pad_to_chunk=False)
    ws = [clips["sine"], clips["noise"]]
    ref = ext(ws, sampling_rate=SR, return_tensors="np", padding="longest",
              return_attention_mask=True)
    feats, mask = log_mel_batch(ws, cfg)
    assert feats.shape == (2, cfg.n_mels, clips["sine"].size // 160)
    assert np.abs(feats - ref["input_features"]).max() <= TOL
    np.testing.assert_array_equal(mask, ref["attention_mask"].astype(bool))
    assert mask.sum(1).tolist() == [-(-w.size // 160) for w in ws]
    single = log_mel(clips["noise"], cfg)  # frames = len // hop
    assert single.shape == (cfg.n_mels, clips["noise"].size // 160)
    ref1 = ext(clips["noise"], sampling_rate=SR, return_tensors="np", padding="longest")
    assert np.abs(single - ref1["input_features"][0]).max() <= TOL


def test_threads_same_result(clips):
    cfg = AudioConfig()
    ws = [clips["sine"], clips["noise"], clips["noise"][:5000]]
    one, m1 = log_mel_batch(ws, cfg, num_threads=1)
    two, m2 = log_mel_batch(ws, cfg, num_threads=2)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(m1, m2)
    with pytest.raises(ValueError, match="num_threads must be positive"):
        log_mel_batch(ws, cfg, num_threads=0)


def test_padded_batch_mask(clips):
    cfg = AudioConfig()
    feats, mask = log_mel_batch(np.stack([clips["noise"], clips["noise"][::-1]]), cfg)
    assert feats.shape == (2, 80, 3000) and mask.shape == (2, 3000)
    assert mask.sum(1).tolist() == [-(-clips["noise"].size // 160)] * 2
    # frames past the clip only see zero padding: they sit at the clamp floor (peak - 8 + 4) / 4
    floor = (feats[0].max() * 4 - 4 - 8 + 4) / 4
    np.testing.assert_allclose(feats[0, :, mask[0].sum() + 2:], floor, atol=1e-6)


def test_decode_int16_stereo_wav_and_flac():
    rng = np.random.default_rng(1)
    pcm = rng.integers(-20000, 20000, size=(1600, 2), dtype=np.int16)
    expected = pcm.astype(np.float64).mean(axis=1) / 32768.0
    for fmt in ("WAV", "FLAC"):
        out = decode_audio(_wav_bytes(pcm, SR, fmt=fmt), AudioConfig())
        assert out.dtype == np.float32 and out.shape == (1600,)
        np.testing.assert_allclose(out, expected, atol=1e-6)
    np.testing.assert_allclose(to_float_waveform(pcm[:, 0]), pcm[:, 0] / 32768.0, atol=1e-7)


def test_decode_resamples_to_16k():
    sr = 8000
    t = np.arange(sr) / sr
    tone = (0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
    out = decode_audio(_wav_bytes(tone, sr, subtype="FLOAT"), AudioConfig())
    assert out.shape == (SR,)
    spectrum = np.abs(np.fft.rfft(out))
    assert np.argmax(spectrum) * SR / out.size == pytest.approx(1000.0, abs=1.0)
    np.testing.assert_array_equal(resample(out, SR, AudioConfig()), out)  # same rate: no-op


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_espeak_speech_parity(tmp_path):
    path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "omni modal models hear and see"],
                   check=True, capture_output=True)
    data = path.read_bytes()
    wav = decode_audio(data, AudioConfig())
    raw, sr = sf.read(io.BytesIO(data), dtype="float32")
    expected = librosa.resample(raw, orig_sr=sr, target_sr=SR, res_type="soxr_hq")
    np.testing.assert_allclose(wav, expected, atol=1e-6)
    ext = WhisperFeatureExtractor(feature_size=128)
    ref = ext(wav, sampling_rate=SR, return_tensors="np")["input_features"][0]
    assert np.abs(log_mel(wav, AudioConfig(n_mels=128)) - ref).max() <= TOL


def test_chunk_waveform():
    cfg = AudioConfig(max_chunks=2)
    w = np.linspace(-1, 1, SR * 65, dtype=np.float32)
    chunks, lengths = chunk_waveform(w, cfg.replace(max_chunks=25))
    assert chunks.shape == (3, cfg.n_samples) and lengths.tolist() == [480000, 480000, 80000]
    np.testing.assert_array_equal(chunks.reshape(-1)[: w.size], w)
    assert not chunks[2, 80000:].any()
    chunks, lengths = chunk_waveform(w, cfg)
    assert chunks.shape == (2, cfg.n_samples) and lengths.tolist() == [480000, 480000]


def test_decode_errors():
    cfg = AudioConfig()
    with pytest.raises(ValueError, match="empty audio bytes"):
        decode_audio(b"", cfg)
    with pytest.raises(ValueError, match="cannot decode audio: "):
        decode_audio(b"RIFF\x00\x01garbage" * 10, cfg)
    with pytest.raises(ValueError, match="zero-length audio"):
        decode_audio(_wav_bytes(np.zeros((0,), np.int16), SR), cfg)
    bad = np.zeros(100, np.float32)
    bad[3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        decode_audio(_wav_bytes(bad, SR, subtype="FLOAT"), cfg)


def test_waveform_errors():
    cfg = AudioConfig()
    with pytest.raises(ValueError, match="zero-length waveform"):
        log_mel(np.zeros(0, np.float32), cfg)
    with pytest.raises(ValueError, match="non-finite"):
        log_mel(np.array([0.0, np.inf] * 300, np.float32), cfg)
    with pytest.raises(ValueError, match="must be 1-D mono"):
        log_mel(np.zeros((2, 1000), np.float32), cfg)
    with pytest.raises(ValueError, match="too short"):
        log_mel(np.zeros(150, np.float32), cfg.replace(pad_to_chunk=False))
    with pytest.raises(ValueError, match="empty batch"):
        log_mel_batch([], cfg)
    with pytest.raises(ValueError, match="not audio"):
        to_float_waveform(np.array(["a"]))
    with pytest.raises(ValueError, match="orig_sr must be positive"):
        resample(np.zeros(10, np.float32), 0, cfg)


def test_config_validation():
    with pytest.raises(ValueError, match="n_fft must be even"):
        AudioConfig(n_fft=401)
    with pytest.raises(ValueError, match="fmax"):
        AudioConfig(fmax=9000.0)
    with pytest.raises(ValueError, match="resample_type"):
        AudioConfig(resample_type="nope")
    with pytest.raises(ValueError, match="n_mels must be positive"):
        AudioConfig(n_mels=0)
    with pytest.raises(ValueError, match=r"unknown keys \['n_mel'\]"):
        AudioConfig.from_dict({"n_mel": 128})
    cfg = AudioConfig.from_dict({"n_mels": 128, "pad_to_chunk": False})
    assert (cfg.n_mels, cfg.n_samples, cfg.n_frames) == (128, 480000, 3000)
