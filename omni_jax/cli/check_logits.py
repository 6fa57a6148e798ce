"""Load a Hugging Face checkpoint in transformers and in omni_jax, run the same random inputs,
print the max abs difference (and KL divergence for language models); exit 1 above tolerance.

  python -m omni_jax.cli.check_logits --hf DIR [--atol 1e-4] [--kl-tol 1e-6] [--seq 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np

from omni_jax.convert import io
from omni_jax.convert.registry import detect_kind, import_hf


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over positions of KL(softmax(p) || softmax(q)), in float64."""
    p = p_logits.astype(np.float64) - p_logits.max(-1, keepdims=True)
    q = q_logits.astype(np.float64) - q_logits.max(-1, keepdims=True)
    logp = p - np.log(np.exp(p).sum(-1, keepdims=True))
    logq = q - np.log(np.exp(q).sum(-1, keepdims=True))
    return float(np.mean(np.sum(np.exp(logp) * (logp - logq), axis=-1)))


def _run_pair(kind: str, path: str, config, params, args) -> tuple[np.ndarray, np.ndarray]:
    import jax.numpy as jnp
    import torch
    import transformers

    rng = np.random.default_rng(args.seed)
    if kind == "qwen2":
        from omni_jax.llm import Decoder

        ids = rng.integers(0, config.vocab_size, size=(args.batch, args.seq))
        hf = transformers.Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
        got = Decoder(config).apply(params, jnp.asarray(ids, jnp.int32))["logits"]
        return ref, np.asarray(got)
    if kind == "siglip_vision":
        from omni_jax.encoders.vision import SiglipVisionEncoder

        config = dataclasses.replace(config, select_layer=-1, use_post_layernorm=True)
        size = config.image_size
        pix = rng.uniform(-1, 1, size=(args.batch, size, size, config.num_channels))
        hf = transformers.SiglipVisionModel.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(pixel_values=torch.tensor(pix.transpose(0, 3, 1, 2), dtype=torch.float32))
        got = SiglipVisionEncoder(config).apply(params, jnp.asarray(pix, jnp.float32))
        return ref.last_hidden_state.numpy(), np.asarray(got)
    if kind == "whisper_encoder":
        from omni_jax.encoders.audio import WhisperEncoder

        frames = 2 * config.max_source_positions
        feats = rng.normal(size=(args.batch, config.num_mel_bins, frames)).astype(np.float32)
        hf = transformers.WhisperModel.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf.encoder(input_features=torch.tensor(feats)).last_hidden_state.numpy()
        got = WhisperEncoder(config).apply(params, jnp.asarray(feats))
        return ref, np.asarray(got)
    raise ValueError(f"no check defined for kind {kind!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m omni_jax.cli.check_logits", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="Hugging Face checkpoint directory")
    ap.add_argument("--atol", type=float, default=1e-4, help="max abs difference allowed")
    ap.add_argument("--kl-tol", type=float, default=1e-6, help="mean KL allowed (LMs)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32, help="tokens per row (LMs)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        kind = detect_kind(io.read_config(args.hf))
        kind, config, params, _ = import_hf(args.hf)
        ref, got = _run_pair(kind, args.hf, config, params, args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if ref.shape != got.shape:
        print(f"shape mismatch: transformers {ref.shape} vs omni_jax {got.shape}")
        return 1
    diff = float(np.max(np.abs(ref - got)))
    ok = diff <= args.atol
    line = f"kind={kind} shape={tuple(ref.shape)} max_abs_diff={diff:.3e} (atol {args.atol:g})"
    if kind == "qwen2":
        kl = _kl(ref, got)
        ok = ok and kl <= args.kl_tol
        line += f" kl={kl:.3e} (tol {args.kl_tol:g})"
    print(line + (" OK" if ok else " FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
