"""Media front-end throughput: our log-mel / SigLIP preprocessing vs transformers, same inputs.

Audio: omni_jax.data.features.audio.log_mel_batch vs WhisperFeatureExtractor.__call__ (its
torch.stft path, the default when torch is installed) and its float64 NumPy path
(`_np_extract_fbank_features`, what it runs without torch). Image: preprocess vs
SiglipImageProcessorPil (transformers 5's default SiglipImageProcessor is the torchvision
backend; torchvision is not installed). Threads are matched: `x_1t` compares our 1-thread
path with the reference on 1 thread (torch.set_num_threads(1); the PIL processor as
shipped), `x_2t` both on 2 threads (torch intra-op threads = 2; the PIL processor called on
the two halves of the batch in a 2-thread pool, since it has no thread option of its own;
ours: num_threads=2). `x_default` is the out-of-the-box comparison (our defaults: log-mel 1
thread, image pool of CPU count; reference: torch's default threads / PIL processor as
shipped). Timings are interleaved (ours, reference, ours, ...) within each thread group
so load from other processes hits both alike; items/s from the median. Outputs are also
compared (max abs difference) so a fast-but-wrong path cannot pass.

  python bench/features.py            # full run (~1-2 min)
  python bench/features.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import WhisperFeatureExtractor  # noqa: E402
from transformers.models.siglip.image_processing_pil_siglip import (  # noqa: E402
    SiglipImageProcessorPil,
)

from bench.common import format_table, machine_info, write_json  # noqa: E402
from omni_jax.data.features.audio import log_mel_batch  # noqa: E402
from omni_jax.data.features.config import AudioConfig, ImageConfig  # noqa: E402
from omni_jax.data.features.image import preprocess  # noqa: E402

SR = 16000


class NumpyWhisperFE(WhisperFeatureExtractor):
    """WhisperFeatureExtractor forced onto its NumPy (audio_utils.spectrogram) path."""

    def _torch_extract_fbank_features(self, waveform: np.ndarray, device: str = "cpu"):
        return self._np_extract_fbank_features(waveform, device)


TORCH_THREADS = torch.get_num_threads()  # torch's default, restored for the default reference


def with_threads(n: int, fn: Callable[..., Any], *a: Any, **kw: Any) -> Any:
    """Call fn with torch intra-op threads set to n (the reference's STFT runs in torch)."""
    torch.set_num_threads(n)
    try:
        return fn(*a, **kw)
    finally:
        torch.set_num_threads(TORCH_THREADS)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, one warm-up each, then `repeats` rounds in turn."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def medians(fns: dict[str, Callable[[], Any]], groups: list[list[str]], repeats: int
            ) -> dict[str, float]:
    """Median seconds per call; each group (the implementations a ratio compares) is timed
    interleaved on its own, so a 1-thread reference (torch thread toggling, float64 NumPy
    buffers) does not perturb the 2-thread pair, and vice versa."""
    out: dict[str, float] = {}
    for g in groups:
        times = interleaved({k: fns[k] for k in g if k in fns}, repeats)
        out.update({k: statistics.median(v) for k, v in times.items()})
    return out


def speech_like(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Noise shaped by a slow envelope plus a few harmonics (not silence-padded)."""
    n = int(SR * seconds)
    t = np.arange(n) / SR
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t) ** 2
    tone = sum(np.sin(2 * np.pi * f * t) for f in (180.0, 360.0, 540.0)) / 3
    return (0.2 * env * (tone + 0.3 * rng.standard_normal(n))).astype(np.float32)


def audio_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    b = args.batch_audio
    cases = {
        f"30s x{b}, pad 30s": ([speech_like(rng, 30.0) for _ in range(b)], True),
        f"2-20s x{b}, pad 30s": ([speech_like(rng, s) for s in rng.uniform(2, 20, b)], True),
        f"2-20s x{b}, pad longest": ([speech_like(rng, s) for s in rng.uniform(2, 20, b)],
                                     False),
    }
    rows = []
    for n_mels in args.mels:
        hf = WhisperFeatureExtractor(feature_size=n_mels)
        hf_np = NumpyWhisperFE(feature_size=n_mels)
        for name, (clips, pad) in cases.items():
            cfg = AudioConfig(n_mels=n_mels, pad_to_chunk=pad)
            kw = dict(sampling_rate=SR, return_tensors="np",
                      padding="max_length" if pad else "longest")
            fns = {"ours_1t": partial(log_mel_batch, clips, cfg, num_threads=1),
                   "ours_2t": partial(log_mel_batch, clips, cfg, num_threads=2),
                   "hf_torch_1t": partial(with_threads, 1, hf, clips, **kw),
                   "hf_torch_2t": partial(with_threads, 2, hf, clips, **kw),
                   "hf_numpy": partial(hf_np, clips, **kw)}
            if TORCH_THREADS != 2:
                fns["hf_torch"] = partial(with_threads, TORCH_THREADS, hf, clips, **kw)
            if args.quick:
                fns.pop("hf_numpy")
            ref = fns["hf_torch_2t"]()["input_features"]
            err = float(max(np.abs(fns[k]()[0] - ref).max() for k in ("ours_1t", "ours_2t")))
            t = medians(fns, [["ours_1t", "hf_torch_1t", "hf_numpy"],
                              ["ours_2t", "hf_torch_2t", "hf_torch"]], args.repeats)
            row = {"task": f"log-mel {n_mels}", "case": name}
            row.update({f"{k}_items_s": len(clips) / v for k, v in t.items()})
            row["x_1t"] = t["hf_torch_1t"] / t["ours_1t"]
            row["x_2t"] = t["hf_torch_2t"] / t["ours_2t"]
            row["x_default"] = t.get("hf_torch", t["hf_torch_2t"]) / t["ours_1t"]
            if "hf_numpy" in t:
                row["x_vs_hf_numpy"] = t["hf_numpy"] / t["ours_1t"]
            row["max_abs_err"] = err
            rows.append(row)
            print(format_table([row]), flush=True)
    return rows


_POOL2 = ThreadPoolExecutor(max_workers=2)


def hf_halves(hf: SiglipImageProcessorPil, imgs: list[np.ndarray]) -> np.ndarray:
    """The PIL processor on 2 threads: each half of the batch in its own thread."""
    half = (len(imgs) + 1) // 2
    parts = _POOL2.map(lambda part: hf(part, return_tensors="np",
                                       input_data_format="channels_last")["pixel_values"],
                       (imgs[:half], imgs[half:]))
    return np.concatenate(list(parts))


def image_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    b = args.batch_image
    mixed = [(256, 256), (480, 640), (768, 1024), (300, 500), (1080, 720), (384, 384),
             (600, 800), (200, 900)]
    cases = {
        f"640x480 x{b}": [rng.integers(0, 256, (480, 640, 3), np.uint8) for _ in range(b)],
        f"mixed sizes x{b}": [rng.integers(0, 256, mixed[i % len(mixed)] + (3,), np.uint8)
                                for i in range(b)],
    }
    rows = []
    for size in args.sizes:
        hf = SiglipImageProcessorPil(size={"height": size, "width": size})
        cfg = ImageConfig(image_size=size)
        for name, imgs in cases.items():
            ref = partial(hf, imgs, return_tensors="np", input_data_format="channels_last")
            fns = {"ours_1t": partial(preprocess, imgs, cfg, num_threads=1),
                   "ours_2t": partial(preprocess, imgs, cfg, num_threads=2),
                   "hf_pil": ref,
                   "hf_pil_2t": partial(hf_halves, hf, imgs)}
            if (os.cpu_count() or 1) != 2:
                fns["ours"] = partial(preprocess, imgs, cfg)
            want = ref()["pixel_values"].transpose(0, 2, 3, 1)
            err = float(max(np.abs(fns[k]() - want).max() for k in ("ours_1t", "ours_2t")))
            t = medians(fns, [["ours_1t", "hf_pil"], ["ours_2t", "hf_pil_2t", "ours"]],
                        args.repeats)
            row = {"task": f"siglip {size}", "case": name}
            row.update({f"{k}_items_s": len(imgs) / v for k, v in t.items()})
            row.update({"x_1t": t["hf_pil"] / t["ours_1t"], "x_2t": t["hf_pil_2t"] / t["ours_2t"],
                        "x_default": t["hf_pil"] / t.get("ours", t["ours_2t"]),
                        "max_abs_err": err})
            rows.append(row)
            print(format_table([row]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch-audio", type=int, default=8)
    p.add_argument("--batch-image", type=int, default=16)
    p.add_argument("--mels", type=int, nargs="+", default=[80, 128])
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 384])
    args = p.parse_args()
    if args.quick:
        args.repeats, args.batch_audio, args.batch_image = 2, 2, 4
        args.mels, args.sizes = [128], [384]
    audio, image = audio_rows(args), image_rows(args)
    print("\n" + format_table(audio) + "\n\n" + format_table(image))
    info = machine_info()
    info["torch_threads_default"] = TORCH_THREADS
    path = write_json("features", {"audio": audio, "image": image, "machine": info,
                                   "args": vars(args)})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
