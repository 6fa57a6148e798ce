"""Whisper log-mel features on the host (NumPy + librosa), matching WhisperFeatureExtractor.

Pipeline (transformers' numpy path, audio_utils.spectrogram): pad/truncate to 30 s (or not),
centered frames with reflect padding, periodic Hann window, |rfft|^2, slaney-scale
slaney-normalized mel filters (librosa.filters.mel(htk=False, norm="slaney"), equal to
transformers' mel_filter_bank to 1e-15), log10 of max(mel, 1e-10), drop the last frame,
clamp to (example max - 8), then (x + 4) / 4. Features are [n_mels, frames] like
transformers' `input_features` (our WhisperEncoder takes [batch, n_mels, frames]).

Speed: float32 throughout, one batched rfft per clip (scipy.fft), the mel projection as a
sparse product (each frequency bin feeds at most 2 triangular filters: ~400 non-zeros instead
of 201 x n_mels), written straight into the [n_mels, frames] layout; frames that only see zero
padding are not transformed (their power is exactly 0, so their log-mel is the floor). The
whole pipeline of a clip (padding to the final clamp) runs in one call on per-thread scratch
buffers, so clips spread over threads with no serial steps. A 30 s clip (80 mels, 1 thread,
~3.5 ms): rfft 1.4 ms, windowed-frame copy 0.5, power 0.6, mel 0.2, log/clamp 0.2, pad 0.1.
"""

from __future__ import annotations

import functools
import io
import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import librosa
import numpy as np
import scipy.fft
import scipy.sparse
import soundfile as sf

from omni_jax.data.features.config import AudioConfig

__all__ = ["mel_filters", "log_mel", "log_mel_batch", "resample", "decode_audio",
           "to_float_waveform", "chunk_waveform", "frame_mask"]


@functools.lru_cache(maxsize=16)
def _filters(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    fb = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax,
                             htk=False, norm="slaney", dtype=np.float64)  # [n_mels, n_fft//2+1]
    return np.ascontiguousarray(fb.T)  # [freq, n_mels]


def mel_filters(config: AudioConfig) -> np.ndarray:
    """Slaney mel filter bank [n_fft // 2 + 1, n_mels] (float64, transformers' layout)."""
    return _filters(config.sampling_rate, config.n_fft, config.n_mels, config.fmin, config.fmax)


@functools.lru_cache(maxsize=16)
def _kernels(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float
             ) -> tuple[np.ndarray, scipy.sparse.csr_matrix]:
    window = np.hanning(n_fft + 1)[:-1].astype(np.float32)  # periodic Hann  [n_fft]
    fb = _filters(sr, n_fft, n_mels, fmin, fmax)
    return window, scipy.sparse.csr_matrix(fb.T.astype(np.float32))  # [n_mels, freq] sparse


def to_float_waveform(waveform: np.ndarray) -> np.ndarray:
    """Integer PCM -> float32 in [-1, 1] (int16 / 2^15, int32 / 2^31, uint8 centred); floats
    are cast to float32 unchanged."""
    w = np.asarray(waveform)
    if w.dtype == np.uint8:
        return (w.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(w.dtype, np.signedinteger):
        return (w.astype(np.float64) / float(2 ** (8 * w.dtype.itemsize - 1))).astype(np.float32)
    if np.issubdtype(w.dtype, np.floating):
        return w.astype(np.float32, copy=False)
    raise ValueError(f"waveform dtype {w.dtype} is not audio; expected float or integer PCM")


def _check_waveform(w: np.ndarray, config: AudioConfig, where: str) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 1:
        raise ValueError(f"{where}: waveform must be 1-D mono [samples], got shape {w.shape}")
    if w.size == 0:
        raise ValueError(f"{where}: zero-length waveform; expected at least one sample")
    w = to_float_waveform(w)
    if not np.isfinite(w).all():
        raise ValueError(f"{where}: waveform has non-finite samples (NaN/inf)")
    min_len = max(config.hop_length, config.n_fft // 2 + 1)
    if not config.pad_to_chunk and w.size < min_len:
        raise ValueError(f"{where}: waveform of {w.size} samples is too short for unpadded "
                         f"features; need at least {min_len} (or pad_to_chunk=True)")
    return w


@functools.lru_cache(maxsize=4)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="omni_jax_logmel")


_local = threading.local()


def _workspace(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 scratch array of `shape`, reused per thread: fresh multi-MB buffers per clip
    cost page faults that serialize threads (measured ~25-35% of a 30 s clip's time)."""
    size = math.prod(shape)
    buf = getattr(_local, name, None)
    if buf is None or buf.size < size:
        buf = np.empty(size, np.float32)
        setattr(_local, name, buf)
    return buf[:size].reshape(shape)


def _log_mel_clip(w: np.ndarray, n: int, config: AudioConfig, out: np.ndarray) -> None:
    """One float32 waveform, zero-padded / truncated to n samples -> out [n_mels, n // hop]
    (final log-mel). Every step (padding included) runs here, so a thread pool over clips
    parallelizes the whole pipeline (numpy / scipy release the GIL in each of them)."""
    c = config
    window, fb = _kernels(c.sampling_rate, c.n_fft, c.n_mels, c.fmin, c.fmax)
    half, n_out = c.n_fft // 2, out.shape[1]
    length = min(w.size, n)
    padded = _workspace("padded", (n + c.n_fft,))  # [n + n_fft] reflect-padded clip
    if n > half:  # numpy's "reflect" (no edge repeat), written in place
        padded[half:half + length] = w[:length]
        padded[half + length:half + n] = 0.0
        padded[:half] = padded[2 * half:half:-1]
        padded[half + n:] = padded[half + n - 2:n - 2:-1]
    else:  # the reflection wraps more than once: let numpy do it
        x = np.zeros(n, np.float32)
        x[:length] = w[:length]
        padded[...] = np.pad(x, half, mode="reflect")
    # frames starting at or after the signal end see only zeros (incl. the reflected tail):
    # their power is exactly 0, so their log-mel is the floor; they are not transformed
    n_active = n_out
    if length + c.n_fft < n:
        n_active = min(n_out, -(-(length + half) // c.hop_length))
    frames = np.lib.stride_tricks.sliding_window_view(
        padded[:(n_active - 1) * c.hop_length + c.n_fft], c.n_fft)[::c.hop_length]
    windowed = _workspace("windowed", frames.shape)  # [frames, n_fft]
    np.multiply(frames, window, out=windowed)
    spec = scipy.fft.rfft(windowed, axis=-1, overwrite_x=True)  # [frames, freq] c64
    re_im = spec.view(np.float32)  # [frames, 2 * freq] interleaved (re, im)
    np.square(re_im, out=re_im)
    power = _workspace("power", (spec.shape[1], n_active))  # [freq, frames]
    np.add(re_im[:, 0::2].T, re_im[:, 1::2].T, out=power)
    active = out[:, :n_active]  # [n_mels, frames]
    active[...] = fb @ power
    np.maximum(active, c.log_floor, out=active)
    np.log10(active, out=active)
    if n_active < n_out:
        floor = np.log10(np.full((1,), c.log_floor, np.float32))[0]
        out[:, n_active:] = floor
        peak = max(active.max(), floor)
    else:
        peak = active.max()
    np.maximum(out, peak - np.float32(c.dynamic_range), out=out)
    out += 4.0
    out *= 0.25


def frame_mask(lengths: np.ndarray, n_frames: int, config: AudioConfig) -> np.ndarray:
    """[batch] sample counts -> [batch, n_frames] bool; frame i is real iff i * hop < length
    (transformers' attention_mask[:, ::hop_length] rule)."""
    starts = np.arange(n_frames) * config.hop_length  # [frames]
    return starts[None, :] < np.asarray(lengths)[:, None]


def log_mel_batch(waveforms: Sequence[np.ndarray] | np.ndarray, config: AudioConfig,
                  num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Waveforms at config.sampling_rate -> (log-mel [batch, n_mels, frames] float32,
    frame mask [batch, frames] bool). pad_to_chunk: every clip padded/truncated to
    chunk_seconds (frames = n_frames); otherwise zero-padded to the longest clip
    (frames = longest // hop_length), like transformers' padding="longest". num_threads > 1
    spreads clips over a thread pool; the default is 1 (serial): data loaders already
    parallelize across examples; on the shared 2-core host a second thread gained 1.15-1.55x
    (bench/features.py), less when other work competes for the cores."""
    if num_threads is not None and num_threads <= 0:
        raise ValueError(f"log_mel_batch: num_threads must be positive, got {num_threads}")
    if isinstance(waveforms, np.ndarray) and waveforms.ndim == 2:
        waveforms = list(waveforms)
    if len(waveforms) == 0:
        raise ValueError("log_mel_batch: empty batch; expected at least one waveform")
    ws = [_check_waveform(w, config, f"log_mel_batch[{i}]") for i, w in enumerate(waveforms)]
    n = config.n_samples if config.pad_to_chunk else max(w.size for w in ws)
    lengths = np.array([min(w.size, n) for w in ws])
    feats = np.empty((len(ws), config.n_mels, n // config.hop_length), np.float32)
    workers = min(num_threads or 1, os.cpu_count() or 1, 8, len(ws))
    if workers == 1:
        for i, w in enumerate(ws):
            _log_mel_clip(w, n, config, feats[i])
    else:
        list(_pool(workers).map(lambda i: _log_mel_clip(ws[i], n, config, feats[i]),
                                range(len(ws))))
    return feats, frame_mask(lengths, feats.shape[-1], config)


def log_mel(waveform: np.ndarray, config: AudioConfig) -> np.ndarray:
    """One waveform -> log-mel [n_mels, frames]: frames = n_frames (3000) when pad_to_chunk,
    else len(waveform) // hop_length."""
    feats, _ = log_mel_batch([waveform], config)
    return feats[0]


def resample(waveform: np.ndarray, orig_sr: int, config: AudioConfig) -> np.ndarray:
    """Resample to config.sampling_rate with librosa (res_type = config.resample_type; the
    default soxr_hq is a fast band-limited resampler, ~-100 dB aliasing)."""
    if orig_sr <= 0:
        raise ValueError(f"resample: orig_sr must be positive, got {orig_sr}")
    w = to_float_waveform(np.asarray(waveform))
    if orig_sr == config.sampling_rate:
        return w
    out = librosa.resample(w, orig_sr=orig_sr, target_sr=config.sampling_rate,
                           res_type=config.resample_type, axis=-1)
    return out.astype(np.float32, copy=False)


def decode_audio(data: bytes, config: AudioConfig) -> np.ndarray:
    """WAV/FLAC/OGG bytes -> mono float32 waveform [samples] at config.sampling_rate.
    Integer PCM is scaled to [-1, 1] by soundfile; channels are averaged."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"decode_audio: expected bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("decode_audio: empty audio bytes; expected an encoded WAV/FLAC file")
    try:
        samples, sr = sf.read(io.BytesIO(bytes(data)), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise ValueError(f"cannot decode audio: {e}") from e
    if samples.shape[0] == 0:
        raise ValueError("decode_audio: zero-length audio (0 samples); expected at least one")
    mono = samples.mean(axis=1, dtype=np.float32)  # [samples]
    if not np.isfinite(mono).all():
        raise ValueError("decode_audio: audio has non-finite samples (NaN/inf)")
    return resample(mono, int(sr), config)


def chunk_waveform(waveform: np.ndarray, config: AudioConfig) -> tuple[np.ndarray, np.ndarray]:
    """Split a long waveform into chunk_seconds pieces (last one zero-padded; Ola keeps at most
    max_chunks, the rest is dropped) -> (chunks [n, n_samples], lengths [n])."""
    w = _check_waveform(waveform, config.replace(pad_to_chunk=True), "chunk_waveform")
    n = config.n_samples
    count = min(-(-w.size // n), config.max_chunks)
    out = np.zeros((count * n,), np.float32)
    used = min(w.size, count * n)
    out[:used] = w[:used]
    lengths = np.clip(used - np.arange(count) * n, 0, n)
    return out.reshape(count, n), lengths
