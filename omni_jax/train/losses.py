"""Training objectives: a registry name -> fn(outputs, batch, **options) -> (scalar, metrics).

A stage names its losses with weights (`{"ce": 1.0}` or `{"ce": {"weight": 1.0, "z_loss":
1e-4}}`); `make_objective` combines them. A new objective is one registered function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from omni_jax.train.fused_ce import fused_cross_entropy

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    """Decorator: make `fn(outputs, batch, **options) -> (scalar, metrics)` usable as `name`."""
    def deco(fn: LossFn) -> LossFn:
        if name in LOSSES and LOSSES[name] is not fn:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = fn
        return fn
    return deco


def _token_nll(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """fp32 logits [..., vocab], targets [...] -> (nll [...], logsumexp [...])."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - tgt, lse


def _fused_nll(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
               chunk: int) -> tuple[jax.Array, jax.Array]:
    """LM-head matmul + NLL per seq chunk, rematerialized: [batch, seq, vocab] never lives whole.

    hidden [batch, seq, embed], kernel [embed, vocab] -> (nll, lse) [batch, seq].
    """
    b, s, d = hidden.shape
    if s % chunk:
        raise ValueError(f"cross_entropy: seq {s} is not divisible by chunk_size {chunk}")
    n = s // chunk
    hs = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)  # [n, batch, chunk, embed]
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(args):
        h, t = args
        return _token_nll(jnp.einsum("bcd,dv->bcv", h, kernel.astype(h.dtype)), t)

    nll, lse = jax.lax.map(one, (hs, ts))  # [n, batch, chunk]
    return nll.swapaxes(0, 1).reshape(b, s), lse.swapaxes(0, 1).reshape(b, s)


def cross_entropy(logits: jax.Array | None, targets: jax.Array, mask: jax.Array | None = None,
                  *, z_loss: float = 0.0, hidden: jax.Array | None = None,
                  kernel: jax.Array | None = None,
                  chunk_size: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked token cross-entropy in fp32: sum over masked tokens / their count.

    Either logits [batch, seq, vocab], or hidden [batch, seq, embed] + kernel [embed, vocab]
    with chunk_size (fused LM head: without z_loss train.fused_ce over token chunks, whose
    custom VJP never stores [tokens, vocab]; with z_loss a seq-chunked head). z_loss adds
    z_loss * logsumexp^2.
    targets [batch, seq] are already shifted (targets[t] = input_ids[t + 1]).
    """
    if logits is not None:
        nll, lse = _token_nll(logits, targets)
    else:
        if hidden is None or kernel is None:
            raise ValueError("cross_entropy: pass logits, or hidden and kernel")
        if not z_loss:  # fused head + CE, gradients in the forward (train/fused_ce.py)
            flat_mask = None if mask is None else mask.reshape(-1).astype(jnp.float32)
            total, count = fused_cross_entropy(
                hidden.reshape(-1, hidden.shape[-1]), kernel, targets.reshape(-1), flat_mask,
                chunk_size=chunk_size or 1024)
            ce = total / jnp.maximum(count, 1.0)
            return ce, {"ce": ce, "tokens": count}
        nll, lse = _fused_nll(hidden, kernel, targets, chunk_size or hidden.shape[1])
    mask = jnp.ones_like(nll) if mask is None else mask.astype(jnp.float32)
    count = jnp.sum(mask)
    denom = jnp.maximum(count, 1.0)
    ce = jnp.sum(nll * mask) / denom
    zl = jnp.sum(lse**2 * mask) / denom
    loss = ce + z_loss * zl if z_loss else ce
    return loss, {"ce": ce, "z_loss": zl, "tokens": count}


@register_loss("ce")
def next_token_ce(outputs: Mapping[str, Any], batch: Mapping[str, jax.Array], *,
                  z_loss: float = 0.0,
                  chunk_size: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token CE on outputs["logits"] (or fused from outputs["hidden"]/["lm_head"])."""
    return cross_entropy(outputs.get("logits"), batch["targets"], batch.get("loss_mask"),
                         z_loss=z_loss, hidden=outputs.get("hidden"),
                         kernel=outputs.get("lm_head"), chunk_size=chunk_size)


def loss_spec(name: str, spec: float | Mapping[str, Any]) -> tuple[float, dict[str, Any]]:
    """A stage's loss entry (weight | {"weight": w, **options}) -> (weight, options)."""
    if isinstance(spec, int | float):
        return float(spec), {}
    spec = dict(spec)
    if "weight" not in spec:
        raise ValueError(f"loss {name!r}: a dict spec needs a 'weight', got keys {sorted(spec)}")
    return float(spec.pop("weight")), spec


def make_objective(losses: Mapping[str, float | Mapping[str, Any]],
                   registry: Mapping[str, LossFn] | None = None
                   ) -> Callable[[Mapping[str, Any], Mapping[str, jax.Array]],
                                 tuple[jax.Array, dict[str, jax.Array]]]:
    """{name: weight | {"weight": w, **options}} -> fn(outputs, batch) -> (total, metrics).

    Metrics hold "loss/<name>" (unweighted) and "<name>/<metric>" for each objective.
    """
    registry = LOSSES if registry is None else registry
    if not losses:
        raise ValueError("objective: a stage needs at least one loss")
    parts = []
    for name, spec in losses.items():
        if name not in registry:
            raise ValueError(f"unknown loss {name!r}; registered: {sorted(registry)}")
        weight, options = loss_spec(name, spec)
        check = getattr(registry[name], "check_options", None)
        if check is not None:  # bad options fail when the stage is planned
            check(**options)
        parts.append((name, weight, functools.partial(registry[name], **options)))

    def objective(outputs, batch):
        total, metrics = 0.0, {}
        for name, weight, fn in parts:
            value, extra = fn(outputs, batch)
            total = total + weight * value
            metrics[f"loss/{name}"] = value
            metrics.update({f"{name}/{k}": v for k, v in extra.items()})
        metrics["loss/total"] = total
        return total, metrics

    return objective


# registers audio_ctc, image_bow; ctc, unit_ce, dpo, moe_aux
from omni_jax.train import audio_ctc, image_bow, speech_losses  # noqa: E402,F401
