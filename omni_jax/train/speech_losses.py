"""Speech-generator objectives (OpenOmni): CTC over units, AR unit CE, DPO, MoE aux losses.

Registered into `omni_jax.train.losses.LOSSES` as "ctc", "unit_ce", "dpo" and "moe_aux".
`make_objective` binds options with functools.partial, so bad options raise ValueError on
the objective's first call (at trace time, before any compute); each registered loss also
carries `check_options(**options)` for a caller that wants to validate at build time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from omni_jax.train.losses import LossFn, cross_entropy, register_loss

Metrics = dict[str, jax.Array]


def _require(loss: str, where: str, mapping: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    """ValueError naming the first of `keys` missing from `mapping` (outputs or batch)."""
    for key in keys:
        if key not in mapping:
            raise ValueError(f"loss {loss!r} needs {where}[{key!r}]; {where} has keys "
                             f"{sorted(mapping)}")


def _with_check(check: Callable[..., None]) -> Callable[[LossFn], LossFn]:
    """Attach `check` (options -> None or ValueError) to a loss as `check_options`."""
    def deco(fn: LossFn) -> LossFn:
        fn.check_options = check  # type: ignore[attr-defined]
        return fn
    return deco


# ----------------------------------------------------------------------------- CTC

def ctc_feasible(frame_mask: jax.Array, units: jax.Array, unit_mask: jax.Array) -> jax.Array:
    """[B] bool: the frames [B, T] hold the units [B, U] (right padded by unit_mask) and a
    blank between each pair of equal adjacent units."""
    umask = unit_mask.astype(jnp.float32)
    labels = jnp.where(umask > 0, units.astype(jnp.int32), -1)
    repeats = jnp.sum((labels[:, 1:] == labels[:, :-1]) * umask[:, 1:] * umask[:, :-1], -1)
    return jnp.sum(frame_mask.astype(jnp.float32), axis=-1) >= jnp.sum(umask, -1) + repeats


def ctc_nll(log_probs: jax.Array, frame_mask: jax.Array, units: jax.Array,
            unit_mask: jax.Array, *, blank: int | None = None,
            zero_infinity: bool = True) -> tuple[jax.Array, jax.Array]:
    """Per-item CTC negative log-likelihood [B] (fp32) and feasibility [B] bool.

    log_probs [B, T, V+1] (log-softmax; blank = last index unless `blank`), frame_mask [B, T],
    units [B, U] right padded by unit_mask [B, U]. An item is infeasible when its frames are
    fewer than U_b + adjacent repeats: zeroed (value and gradient) with zero_infinity, else
    +inf (as torch). Items with U_b = 0 (padding rows) give 0.
    """
    if log_probs.ndim != 3 or units.ndim != 2 or log_probs.shape[0] != units.shape[0]:
        raise ValueError(f"ctc_nll: log_probs [B, T, V+1] and units [B, U] expected, got "
                         f"{log_probs.shape} and {units.shape}")
    if frame_mask.shape != log_probs.shape[:2] or unit_mask.shape != units.shape:
        raise ValueError(f"ctc_nll: frame_mask {frame_mask.shape} / unit_mask "
                         f"{unit_mask.shape} do not match {log_probs.shape[:2]} / {units.shape}")
    blank = log_probs.shape[-1] - 1 if blank is None else blank
    fmask = frame_mask.astype(jnp.float32)
    umask = unit_mask.astype(jnp.float32)
    labels = jnp.where(umask > 0, units.astype(jnp.int32), -1)  # ignore ids (-100) stay inert
    raw = optax.ctc_loss(log_probs.astype(jnp.float32), 1.0 - fmask, labels, 1.0 - umask,
                         blank_id=blank)
    n_units = jnp.sum(umask, axis=-1)
    feasible = ctc_feasible(frame_mask, units, unit_mask)
    bad = 0.0 if zero_infinity else jnp.inf
    nll = jnp.where(feasible, raw, bad)
    return jnp.where(n_units > 0, nll, 0.0), feasible


def ctc_loglik(log_probs: jax.Array, frame_mask: jax.Array, units: jax.Array,
               unit_mask: jax.Array, *, blank: int | None = None, zero_infinity: bool = True,
               normalize: bool = True) -> jax.Array:
    """OpenOmni's DPO l(y) per pair [B]: -nll / max(U_b, 1) (normalize) or -nll.

    Their released code normalised on batch totals (sum nll / total units); per pair is the
    intent. Infeasible items (zero_infinity) and empty targets give 0.
    """
    nll, _ = ctc_nll(log_probs, frame_mask, units, unit_mask, blank=blank,
                     zero_infinity=zero_infinity)
    if not normalize:
        return -nll
    return -nll / jnp.maximum(jnp.sum(unit_mask.astype(jnp.float32), axis=-1), 1.0)


def _check_ctc(*, zero_infinity: bool = True, normalize: str = "units",
               blank: int | None = None) -> None:
    if normalize not in ("units", "batch_mean"):
        raise ValueError(f"loss 'ctc': normalize must be 'units' or 'batch_mean', got "
                         f"{normalize!r}")


@register_loss("ctc")
@_with_check(_check_ctc)
def ctc_loss(outputs: Mapping[str, Any], batch: Mapping[str, jax.Array], *,
             zero_infinity: bool = True, normalize: str = "units",
             blank: int | None = None) -> tuple[jax.Array, Metrics]:
    """CTC on outputs["speech_log_probs"]: "units" = sum nll / total target units (OpenOmni).

    "batch_mean" = torch's reduction="mean" (mean over real items of nll_b / U_b).
    """
    _check_ctc(zero_infinity=zero_infinity, normalize=normalize, blank=blank)
    _require("ctc", "outputs", outputs, ("speech_log_probs", "speech_frame_mask"))
    _require("ctc", "batch", batch, ("speech_units", "speech_unit_mask"))
    frame_mask, unit_mask = outputs["speech_frame_mask"], batch["speech_unit_mask"]
    nll, feasible = ctc_nll(outputs["speech_log_probs"], frame_mask, batch["speech_units"],
                            unit_mask, blank=blank, zero_infinity=zero_infinity)
    n_units = jnp.sum(unit_mask.astype(jnp.float32), axis=-1)
    real = n_units > 0
    total_units = jnp.sum(n_units)
    if normalize == "units":
        loss = jnp.sum(nll) / jnp.maximum(total_units, 1.0)
    else:
        per = jnp.where(real, nll / jnp.maximum(n_units, 1.0), 0.0)
        loss = jnp.sum(per) / jnp.maximum(jnp.sum(real), 1)
    return loss, {"ctc": loss, "units": total_units,
                  "infeasible": jnp.sum(real & ~feasible).astype(jnp.float32),
                  "frames": jnp.sum(frame_mask.astype(jnp.float32))}


# ------------------------------------------------------------------------- AR units

def _check_unit_ce(*, z_loss: float = 0.0) -> None:
    if z_loss < 0:
        raise ValueError(f"loss 'unit_ce': z_loss must be >= 0, got {z_loss}")


@register_loss("unit_ce")
@_with_check(_check_unit_ce)
def unit_ce(outputs: Mapping[str, Any], batch: Mapping[str, jax.Array], *,
            z_loss: float = 0.0) -> tuple[jax.Array, Metrics]:
    """Masked next-unit CE on outputs["speech_ar_logits"/"_targets"/"_mask"], with accuracy."""
    _check_unit_ce(z_loss=z_loss)
    _require("unit_ce", "outputs", outputs,
             ("speech_ar_logits", "speech_ar_targets", "speech_ar_mask"))
    logits, mask = outputs["speech_ar_logits"], outputs["speech_ar_mask"]
    # masked targets may hold an ignore id (e.g. -100): keep the gather in range
    targets = jnp.where(mask, outputs["speech_ar_targets"], 0)
    loss, metrics = cross_entropy(logits, targets, mask, z_loss=z_loss)
    m = mask.astype(jnp.float32)
    hit = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    metrics["accuracy"] = jnp.sum(hit * m) / jnp.maximum(jnp.sum(m), 1.0)
    return loss, metrics


# ------------------------------------------------------------------------------ DPO

_DPO_KEYS = ("dpo_policy_chosen", "dpo_policy_rejected", "dpo_ref_chosen", "dpo_ref_rejected")


def _check_dpo(*, beta: float = 0.1, kind: str = "sigmoid", label_smoothing: float = 0.0) -> None:
    if not beta > 0:
        raise ValueError(f"loss 'dpo': beta must be > 0, got {beta}")
    if kind not in ("sigmoid", "ipo"):
        raise ValueError(f"loss 'dpo': kind must be 'sigmoid' or 'ipo', got {kind!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"loss 'dpo': label_smoothing must be in [0, 0.5), got "
                         f"{label_smoothing}")
    if kind == "ipo" and label_smoothing:
        raise ValueError("loss 'dpo': label_smoothing applies to kind='sigmoid' only")


@register_loss("dpo")
@_with_check(_check_dpo)
def dpo_loss(outputs: Mapping[str, Any], batch: Mapping[str, jax.Array], *,
             beta: float = 0.1, kind: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[jax.Array, Metrics]:
    """DPO on per-pair log-likelihoods l(y); logits = (pc - pr) - (rc - rr), mean over pairs.

    sigmoid: -(1-ls) log s(b x) - ls log s(-b x) (conservative DPO); ipo: (x - 1/(2b))^2.
    The reference terms get stop_gradient; batch["dpo_mask"] [B] marks real pairs.
    """
    _check_dpo(beta=beta, kind=kind, label_smoothing=label_smoothing)
    _require("dpo", "outputs", outputs, _DPO_KEYS)
    pc, pr, rc, rr = (outputs[k].astype(jnp.float32) for k in _DPO_KEYS)
    rc, rr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
    logits = (pc - pr) - (rc - rr)
    if kind == "sigmoid":
        per = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * logits)
               - label_smoothing * jax.nn.log_sigmoid(-beta * logits))
    else:
        per = (logits - 1.0 / (2.0 * beta)) ** 2
    mask = outputs.get("dpo_mask", batch.get("dpo_mask"))  # real pairs (SpeechHead sets it)
    mask = jnp.ones_like(per) if mask is None else mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask), 1.0)

    def mean(x: jax.Array) -> jax.Array:
        return jnp.sum(x * mask) / n

    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    loss = mean(per)
    return loss, {"rewards/chosen": mean(chosen), "rewards/rejected": mean(rejected),
                  "margin": mean(chosen - rejected),
                  "accuracy": mean((chosen > rejected).astype(jnp.float32)),
                  "pairs": jnp.sum(mask)}


# -------------------------------------------------------------------------- MoE aux

def _check_moe(*, load_balance: float = 1e-2, router_z: float = 1e-3) -> None:
    if load_balance < 0 or router_z < 0:
        raise ValueError(f"loss 'moe_aux': weights must be >= 0, got load_balance="
                         f"{load_balance}, router_z={router_z}")


@register_loss("moe_aux")
@_with_check(_check_moe)
def moe_aux(outputs: Mapping[str, Any], batch: Mapping[str, jax.Array], *,
            load_balance: float = 1e-2, router_z: float = 1e-3) -> tuple[jax.Array, Metrics]:
    """load_balance * outputs["moe_aux"]["load_balance"] + router_z * ["router_z"].

    Without outputs["moe_aux"] (no sparse MoE) the loss is 0 and metrics["present"] is 0.
    """
    _check_moe(load_balance=load_balance, router_z=router_z)
    aux = outputs.get("moe_aux")
    if aux is None:
        zero = jnp.zeros((), jnp.float32)
        return zero, {"present": zero, "load_balance": zero, "router_z": zero}
    _require("moe_aux", "outputs['moe_aux']", aux, ("load_balance", "router_z"))
    lb = jnp.asarray(aux["load_balance"], jnp.float32)
    rz = jnp.asarray(aux["router_z"], jnp.float32)
    loss = load_balance * lb + router_z * rz
    return loss, {"present": jnp.ones((), jnp.float32), "load_balance": lb, "router_z": rz}
