"""Discrete speech units without downloads: k-means (in JAX) over log-mel or Whisper features.

Features: the repo's Whisper log-mel (omni_jax.data.features.audio, 100 Hz, unpadded) mean-pooled
to `frame_rate`, optionally with first-order deltas and +-`context` stacked neighbours; or the
hidden states of a given WhisperEncoder (50 Hz) pooled the same way. Per-dimension mean / std
are fitted on the training frames. K-means: greedy k-means++ on a subsample, then full Lloyd
steps (n <= batch_size) or Sculley mini-batch steps (per-centroid learning rate 1 / count);
an empty / never-used centroid is moved to the point farthest from its centroid. Everything
is deterministic for a seed. A saved tokenizer is `units.json` (format, config, dim) plus
`units.npz` (centroids [k, dim], mean [dim], std [dim], inertia history).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import warnings
import zipfile
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.config_base import StrictConfig, check_choice, check_positive
from omni_jax.data.features.audio import log_mel, resample, to_float_waveform
from omni_jax.data.features.config import AudioConfig

__all__ = ["UnitConfig", "UnitTokenizer", "KMeansResult", "kmeans", "kmeans_plusplus",
           "dedup", "prepare_waveform", "check_units"]

FEATURES = ("log_mel", "whisper")
FORMAT = "omni_jax.speech.units/1"
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class UnitConfig(StrictConfig):
    """Unit tokenizer: features, frame rate, normalisation and k-means hyper-parameters."""

    vocab_size: int = 64  # k
    feature: str = "log_mel"  # "log_mel" (100 Hz base) or "whisper" (encoder states, 50 Hz)
    sample_rate: int = 16000
    frame_rate: int = 50  # Hz; must divide the base rate (mean-pooling factor)
    n_mels: int = 80
    deltas: bool = False  # append first-order deltas of the pooled frames
    context: int = 0  # stack +-context neighbouring pooled frames (edge-padded)
    normalize: bool = True  # per-dimension mean / std, fitted on the training frames
    kmeans_iters: int = 50  # Lloyd iterations or mini-batch steps
    batch_size: int = 4096  # mini-batch (best >= a few x vocab); n <= it: full Lloyd steps
    init_samples: int = 8192  # k-means++ runs on at most this many (random) frames
    init_trials: int = 0  # greedy k-means++ candidates per centroid (0: 2 + int(ln k))
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive("UnitConfig", vocab_size=self.vocab_size, sample_rate=self.sample_rate,
                       frame_rate=self.frame_rate, n_mels=self.n_mels,
                       kmeans_iters=self.kmeans_iters, batch_size=self.batch_size,
                       init_samples=self.init_samples)
        check_choice("UnitConfig", "feature", self.feature, FEATURES)
        if self.context < 0 or self.init_trials < 0:
            raise ValueError(f"UnitConfig: context and init_trials must be >= 0, got "
                             f"{self.context}, {self.init_trials}")
        if self.sample_rate % 100:
            raise ValueError(f"UnitConfig.sample_rate must be a multiple of 100 (10 ms hop), "
                             f"got {self.sample_rate}")
        if self.feature == "whisper" and self.sample_rate != 16000:
            raise ValueError(f"UnitConfig: feature='whisper' needs sample_rate 16000, got "
                             f"{self.sample_rate}")
        if self.base_rate % self.frame_rate:
            raise ValueError(f"UnitConfig.frame_rate={self.frame_rate} must divide the "
                             f"{self.feature} base rate {self.base_rate} Hz")

    @property
    def base_rate(self) -> int:
        """Frame rate of the raw features: 100 Hz log-mel, 50 Hz Whisper states."""
        return 100 if self.feature == "log_mel" else 50

    @property
    def hop_samples(self) -> int:
        """Samples per unit frame (320 at 16 kHz, 50 Hz)."""
        return self.sample_rate // self.frame_rate

    @property
    def audio_config(self) -> AudioConfig:
        """The repo's log-mel front end at 10 ms hop / 25 ms window, unpadded."""
        hop = self.sample_rate // 100
        return AudioConfig(sampling_rate=self.sample_rate, n_mels=self.n_mels,
                           n_fft=2 * (5 * hop // 4), hop_length=hop, pad_to_chunk=False,
                           fmax=self.sample_rate / 2)


def prepare_waveform(wav: Any, sr: int, sample_rate: int, where: str = "waveform"
                     ) -> np.ndarray:
    """Validate a mono waveform (1-D, non-empty, finite) and resample it to `sample_rate`."""
    w = np.asarray(wav)
    if w.ndim != 1:
        raise ValueError(f"{where}: waveform must be 1-D mono [samples], got shape {w.shape}")
    if w.size == 0:
        raise ValueError(f"{where}: empty waveform (0 samples)")
    if not isinstance(sr, int | np.integer) or sr <= 0:
        raise ValueError(f"{where}: sample rate must be a positive int, got {sr!r}")
    w = to_float_waveform(w)
    if not np.isfinite(w).all():
        raise ValueError(f"{where}: waveform has non-finite samples (NaN/inf)")
    return resample(w, int(sr), AudioConfig(sampling_rate=sample_rate, fmax=sample_rate / 2))


def check_units(units: Any, vocab_size: int, where: str = "units") -> np.ndarray:
    """-> units as int32 [frames]; ValueError when empty, not 1-D integer, or out of vocab."""
    u = np.asarray(units)
    if u.ndim != 1:
        raise ValueError(f"{where}: units must be 1-D [frames], got shape {u.shape}")
    if u.size == 0:
        raise ValueError(f"{where}: empty unit sequence")
    if not np.issubdtype(u.dtype, np.integer):
        raise ValueError(f"{where}: units must be integers, got dtype {u.dtype}")
    bad = u[(u < 0) | (u >= vocab_size)]
    if bad.size:
        raise ValueError(f"{where}: unit {int(bad[0])} outside the vocab [0, {vocab_size})")
    return u.astype(np.int32)


def dedup(units: Any) -> tuple[np.ndarray, np.ndarray]:
    """Collapse consecutive repeats -> (units [n] int32, durations in frames [n] int32)."""
    u = np.asarray(units).reshape(-1)
    if u.size == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    return u[starts].astype(np.int32), np.diff(np.r_[starts, u.size]).astype(np.int32)


# ---- k-means (JAX) -------------------------------------------------------------------------
class KMeansResult(NamedTuple):
    centroids: np.ndarray  # [k, dim] float32
    history: np.ndarray  # [iters] mean squared distance per point (batch mean for mini-batch)
    inertia: float  # final mean squared distance over all points
    mode: str  # "lloyd" or "minibatch"


def _sqdist(x: jax.Array, c: jax.Array) -> jax.Array:
    """[n, d], [k, d] -> squared distances [n, k] (clipped at 0)."""
    xc = jnp.dot(x, c.T, precision=_HI)
    return jnp.maximum(jnp.sum(x * x, 1)[:, None] - 2 * xc + jnp.sum(c * c, 1)[None], 0.0)


@functools.partial(jax.jit, static_argnames=("k", "trials"))
def _kmeanspp(key: jax.Array, x: jax.Array, k: int, trials: int) -> jax.Array:
    n = x.shape[0]
    key, sub = jax.random.split(key)
    first = x[jax.random.randint(sub, (), 0, n)]
    d2 = _sqdist(x, first[None])[:, 0]

    def body(i, carry):
        c, d2, key = carry
        key, sub = jax.random.split(key)
        logits = jnp.where(d2.sum() > 0, jnp.log(d2), 0.0)  # D^2 sampling (uniform if all 0)
        cand = jax.random.categorical(sub, logits, shape=(trials,))  # greedy: keep the best
        new = jnp.minimum(d2[None], _sqdist(x[cand], x).astype(d2.dtype))  # [trials, n]
        best = jnp.argmin(new.sum(1))
        return c.at[i].set(x[cand[best]]), new[best], key

    c0 = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(first)
    return jax.lax.fori_loop(1, k, body, (c0, d2, key))[0]


def _reseed(c: jax.Array, empty: jax.Array, x: jax.Array, md: jax.Array) -> jax.Array:
    """Move empty centroids onto the points farthest from their centroid (distinct points)."""
    m = min(c.shape[0], x.shape[0])
    far = jax.lax.top_k(md, m)[1]  # [m] farthest first
    rank = jnp.clip(jnp.cumsum(empty) - 1, 0, m - 1)
    return jnp.where(empty[:, None], x[far[rank]], c)


def _assign(x: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    d = _sqdist(x, c)
    a = jnp.argmin(d, 1)
    return a, jnp.take_along_axis(d, a[:, None], 1)[:, 0]


@functools.partial(jax.jit, static_argnames=("iters",))
def _lloyd(x: jax.Array, c: jax.Array, iters: int) -> tuple[jax.Array, jax.Array]:
    k = c.shape[0]

    def step(c, _):
        a, md = _assign(x, c)
        counts = jax.ops.segment_sum(jnp.ones_like(md), a, k)
        sums = jax.ops.segment_sum(x, a, k)
        means = sums / jnp.maximum(counts, 1.0)[:, None]
        return _reseed(means, counts == 0, x, md), md.mean()

    return jax.lax.scan(step, c, None, length=iters)


@functools.partial(jax.jit, static_argnames=("iters", "batch"))
def _minibatch(key: jax.Array, x: jax.Array, c: jax.Array, iters: int, batch: int
               ) -> tuple[jax.Array, jax.Array]:
    k, n = c.shape[0], x.shape[0]

    def step(carry, key):
        c, seen = carry
        xb = x[jax.random.randint(key, (batch,), 0, n)]  # with replacement, as sklearn
        a, md = _assign(xb, c)
        nb = jax.ops.segment_sum(jnp.ones_like(md), a, k)
        mean_b = jax.ops.segment_sum(xb, a, k) / jnp.maximum(nb, 1.0)[:, None]
        seen = seen + nb
        lr = nb / jnp.maximum(seen, 1.0)  # Sculley: per-centroid rate 1 / (points seen)
        c = c + lr[:, None] * (mean_b - c)
        return (_reseed(c, seen == 0, xb, md), seen), md.mean()

    (c, _), hist = jax.lax.scan(step, (c, jnp.zeros(k, x.dtype)), jax.random.split(key, iters))
    return c, hist


@functools.partial(jax.jit, static_argnames=("chunk",))
def _chunked_inertia(x: jax.Array, c: jax.Array, chunk: int) -> jax.Array:
    n = x.shape[0]
    pad = (-n) % chunk
    xs = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, x.shape[1])
    md = jax.lax.map(lambda xb: _assign(xb, c)[1], xs).reshape(-1)
    return jnp.sum(jnp.where(jnp.arange(n + pad) < n, md, 0.0)) / n


def kmeans_plusplus(x: np.ndarray, config: UnitConfig) -> np.ndarray:
    """Greedy k-means++ centroids [vocab_size, dim] from at most init_samples random rows."""
    x = jnp.asarray(np.asarray(x, np.float32))
    key_sub, key_pp = jax.random.split(jax.random.PRNGKey(config.seed))
    if x.shape[0] > config.init_samples:
        x = x[jax.random.choice(key_sub, x.shape[0], (config.init_samples,), replace=False)]
    trials = config.init_trials or 2 + int(math.log(config.vocab_size))
    return np.asarray(_kmeanspp(key_pp, x, config.vocab_size, trials))


def kmeans(x: np.ndarray, config: UnitConfig) -> KMeansResult:
    """k-means++ init, then Lloyd (n <= batch_size) or Sculley mini-batch steps on [n, dim]."""
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or not np.isfinite(x).all():
        raise ValueError(f"kmeans: need finite points [n > 0, dim], got shape {x.shape}")
    if x.shape[0] < config.vocab_size:
        warnings.warn(f"kmeans: only {x.shape[0]} points for vocab_size={config.vocab_size}; "
                      f"some centroids will be duplicates", stacklevel=2)
    c = jnp.asarray(kmeans_plusplus(x, config))
    xj = jnp.asarray(x)
    if x.shape[0] <= config.batch_size:
        c, hist = _lloyd(xj, c, config.kmeans_iters)
        mode = "lloyd"
    else:
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
        c, hist = _minibatch(key, xj, c, config.kmeans_iters, config.batch_size)
        mode = "minibatch"
    inertia = float(_chunked_inertia(xj, c, min(config.batch_size, x.shape[0])))
    return KMeansResult(np.asarray(c), np.asarray(hist), inertia, mode)


# ---- features and the tokenizer ------------------------------------------------------------
def _pool(x: np.ndarray, p: int) -> np.ndarray:
    t = x.shape[0] // p
    return x[:t * p].reshape(t, p, x.shape[1]).mean(1) if p > 1 else x


def _expand(x: np.ndarray, config: UnitConfig) -> np.ndarray:
    """Pooled frames [T, d] -> [T, d * (1 + deltas) * (2 context + 1)]."""
    if config.deltas:
        e = np.pad(x, ((1, 1), (0, 0)), mode="edge")
        x = np.concatenate([x, 0.5 * (e[2:] - e[:-2])], 1)
    if config.context:
        c = config.context
        e = np.pad(x, ((c, c), (0, 0)), mode="edge")
        x = np.concatenate([e[i:i + x.shape[0]] for i in range(2 * c + 1)], 1)
    return x.astype(np.float32)


class UnitTokenizer:
    """Waveform -> discrete units (nearest k-means centroid of normalised features)."""

    def __init__(self, config: UnitConfig, centroids: np.ndarray, mean: np.ndarray,
                 std: np.ndarray, encoder: tuple[Any, Any] | None = None,
                 history: np.ndarray | None = None) -> None:
        k, d = np.shape(centroids)
        if k != config.vocab_size or np.shape(mean) != (d,) or np.shape(std) != (d,):
            raise ValueError(f"UnitTokenizer: centroids {np.shape(centroids)}, mean "
                             f"{np.shape(mean)}, std {np.shape(std)} do not fit vocab_size="
                             f"{config.vocab_size}")
        self.config = config
        self.centroids = np.asarray(centroids, np.float32)
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.history = np.zeros(0, np.float32) if history is None else np.asarray(history)
        self._apply = None
        self.encoder = None
        if encoder is not None:
            self.set_encoder(encoder)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    def set_encoder(self, encoder: tuple[Any, Any]) -> None:
        """Attach (WhisperEncoder module, variables) for feature='whisper'."""
        module, _ = encoder
        if module.config.num_mel_bins != self.config.n_mels:
            raise ValueError(f"UnitTokenizer: encoder takes {module.config.num_mel_bins} mels, "
                             f"config.n_mels is {self.config.n_mels}")
        self.encoder, self._apply = encoder, jax.jit(module.apply)

    def _whisper(self, mel: np.ndarray) -> np.ndarray:
        """Log-mel [n_mels, frames] -> encoder states [frames // 2, d], max_frames per call."""
        if self._apply is None:
            raise ValueError("UnitTokenizer: feature='whisper' needs the Whisper encoder: "
                             "pass encoder=(WhisperEncoder, variables)")
        module, variables = self.encoder
        span = module.config.max_frames
        frames = mel.shape[1] - mel.shape[1] % 2
        out = []
        for s in range(0, frames, span):
            piece = mel[:, s:min(s + span, frames)]
            padded = np.zeros((1, mel.shape[0], span), np.float32)
            padded[0, :, :piece.shape[1]] = piece  # fixed shape (one compile), masked
            h = self._apply(variables, padded, lengths=np.array([piece.shape[1]]))
            out.append(np.asarray(h[0, :piece.shape[1] // 2], np.float32))
        return np.concatenate(out, 0)

    def features(self, wav: Any, sr: int) -> np.ndarray:
        """Waveform at `sr` (resampled) -> unnormalised features [frames, dim] at frame_rate."""
        c = self.config
        w = prepare_waveform(wav, sr, c.sample_rate, "UnitTokenizer.features")
        if w.size < c.hop_samples or w.size <= c.audio_config.n_fft // 2:
            raise ValueError(f"UnitTokenizer.features: waveform of {w.size} samples is shorter "
                             f"than one unit frame ({c.hop_samples} samples at {c.sample_rate})")
        mel = log_mel(w, c.audio_config)  # [n_mels, len // hop] at 100 Hz
        x = mel.T if c.feature == "log_mel" else self._whisper(mel)
        return _expand(_pool(x, c.base_rate // c.frame_rate), c)

    def encode_features(self, feats: np.ndarray) -> np.ndarray:
        """Unnormalised features [frames, dim] -> nearest-centroid units int32 [frames]."""
        if np.ndim(feats) != 2 or np.shape(feats)[1] != self.dim:
            raise ValueError(f"UnitTokenizer: features must be [frames, {self.dim}], got "
                             f"{np.shape(feats)}")
        x = (np.asarray(feats, np.float32) - self.mean) / self.std
        d = ((x * x).sum(1)[:, None] - 2.0 * x @ self.centroids.T
             + (self.centroids ** 2).sum(1)[None])
        return np.argmin(d, 1).astype(np.int32)

    def encode(self, wav: Any, sr: int) -> np.ndarray:
        """Waveform -> units int32 [frames] (frames = samples * frame_rate / sr, floored)."""
        return self.encode_features(self.features(wav, sr))

    def decode_features(self, units: Any) -> np.ndarray:
        """Units -> approximate features [frames, dim]: de-normalised centroids."""
        u = check_units(units, self.vocab_size, "UnitTokenizer.decode_features")
        return self.centroids[u] * self.std + self.mean

    @classmethod
    def fit(cls, data: Sequence[Any], config: UnitConfig,
            encoder: tuple[Any, Any] | None = None) -> UnitTokenizer:
        """Fit on waveforms (1-D at config.sample_rate, or (wav, sr) pairs) and/or
        precomputed feature arrays [frames, dim]."""
        if len(data) == 0:
            raise ValueError("UnitTokenizer.fit: no training data")
        tok = cls(config, np.zeros((config.vocab_size, 1)), np.zeros(1), np.ones(1), encoder)
        feats = []
        for i, item in enumerate(data):
            if isinstance(item, tuple):
                feats.append(tok.features(item[0], item[1]))
            elif np.ndim(item) == 1:
                feats.append(tok.features(item, config.sample_rate))
            elif np.ndim(item) == 2 and np.size(item) and np.isfinite(item).all():
                feats.append(np.asarray(item, np.float32))
            else:
                raise ValueError(f"UnitTokenizer.fit: item {i} is neither a waveform nor a "
                                 f"finite, non-empty [frames, dim] array (shape "
                                 f"{np.shape(item)})")
        if len({f.shape[1] for f in feats}) != 1:
            raise ValueError(f"UnitTokenizer.fit: feature dims differ: "
                             f"{sorted({f.shape[1] for f in feats})}")
        x = np.concatenate(feats, 0)
        mean = x.mean(0) if config.normalize else np.zeros(x.shape[1], np.float32)
        std = np.maximum(x.std(0), 1e-5) if config.normalize else np.ones(x.shape[1])
        res = kmeans((x - mean) / std, config)
        return cls(config, res.centroids, mean, std, encoder, res.history)

    def save(self, directory: str | os.PathLike) -> None:
        """Write units.json (config) + units.npz (centroids, mean, std, history)."""
        os.makedirs(directory, exist_ok=True)
        meta = {"format": FORMAT, "config": self.config.to_dict(), "dim": self.dim}
        with open(os.path.join(directory, "units.json"), "w") as f:
            json.dump(meta, f, indent=1)
        np.savez(os.path.join(directory, "units.npz"), centroids=self.centroids,
                 mean=self.mean, std=self.std, history=self.history)

    @classmethod
    def load(cls, directory: str | os.PathLike, encoder: tuple[Any, Any] | None = None
             ) -> UnitTokenizer:
        """Read a saved tokenizer; ValueError on missing files, bad json or inconsistent shapes."""
        meta, arrays = read_pair(directory, "units", ("centroids", "mean", "std", "history"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{directory}: units.json format {meta.get('format')!r} is not "
                             f"{FORMAT!r}")
        try:
            config = UnitConfig.from_dict(meta.get("config", {}))
        except TypeError as e:
            raise ValueError(f"{directory}: units.json config is malformed: {e}") from e
        c, m, s = arrays["centroids"], arrays["mean"], arrays["std"]
        if c.shape != (config.vocab_size, meta.get("dim")) or not np.isfinite(c).all() \
                or (s <= 0).any():
            raise ValueError(f"{directory}: centroids {c.shape} do not match vocab_size="
                             f"{config.vocab_size}, dim={meta.get('dim')}, or are not finite, "
                             f"or std is not positive")
        return cls(config, c, m, s, encoder, arrays["history"])


def read_pair(directory: str | os.PathLike, stem: str, keys: Sequence[str]
              ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Load <stem>.json and <stem>.npz from `directory`; ValueError naming what is wrong."""
    paths = [os.path.join(directory, f"{stem}.{ext}") for ext in ("json", "npz")]
    for p in (p for p in paths if not os.path.isfile(p)):
        raise ValueError(f"{directory}: missing {os.path.basename(p)}")
    try:
        with open(paths[0]) as f:
            meta = json.load(f)
        with zipfile.ZipFile(paths[1]), np.load(paths[1], allow_pickle=False) as z:
            arrays = {k: z[k] for k in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{directory}: cannot read {stem}.json / {stem}.npz: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{directory}: {stem}.json is not an object")
    return meta, arrays
