"""Mixture-of-experts layers: OpenOmni's soft dense MoE and a Qwen2-MoE-style sparse top-k block.

Expert weights are stacked `[experts, ...]` on the `expert` logical axis, so the mesh's `expert`
axis shards them (expert parallelism).

SparseMoE dispatch (GShard / Switch style). Tokens are split into groups of S tokens (one group
per batch row by default, or `group_size` tokens); each group routes independently with a
per-expert capacity C = ceil(capacity_factor * S * top_k / E) (C = S: nothing dropped). One-hot
dispatch / combine tensors [G, S, E, C] (T * E * C elements for T = G * S tokens; without
dropping that is T * E * S, so keep S bounded) move tokens into per-expert buffers
[E, G, C, embed], the experts run batched over E, and the combine tensor (router weights on the
kept slots) brings the results back. Under a mesh the buffers are constrained to E on the
`act_expert` axes and G on the remaining `act_batch` axes, so tokens move by an all-to-all over
the expert axis. Assignments beyond an expert's capacity are dropped (that expert adds 0 for the
token); a token's first choices take buffer slots before any token's second choices.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.config_base import StrictConfig, check_positive
from omni_jax.layers.common import constrain, logical_init, parse_dtype
from omni_jax.layers.mlp import SwiGLU, activation


class SoftMoE(nn.Module):
    """out = sum_e softmax(gate(x))_e * fc2_e(act(fc1_e(x))), every expert on every token
    (OpenOmni's speech-generator expansion: no top-k, no auxiliary loss)."""

    num_experts: int
    hidden: int  # expert inner width
    features: int  # output width
    act: str = "relu"
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., embed] -> [..., features]
        e, d = self.num_experts, x.shape[-1]
        init = nn.initializers.normal(self.init_std)
        zeros = nn.initializers.zeros
        gate = nn.Dense(e, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=logical_init(init, ("embed", None)),
                        bias_init=logical_init(zeros, (None,)), name="gate")
        w1 = self.param("fc1_kernel", logical_init(init, ("expert", "embed", "mlp")),
                        (e, d, self.hidden), self.param_dtype)
        b1 = self.param("fc1_bias", logical_init(zeros, ("expert", "mlp")), (e, self.hidden),
                        self.param_dtype)
        w2 = self.param("fc2_kernel", logical_init(init, ("expert", "mlp", None)),
                        (e, self.hidden, self.features), self.param_dtype)
        b2 = self.param("fc2_bias", logical_init(zeros, ("expert", None)), (e, self.features),
                        self.param_dtype)
        lead = x.shape[:-1]
        x = x.astype(self.dtype)
        g = jax.nn.softmax(gate(x).astype(jnp.float32), axis=-1).astype(self.dtype)  # [..., e]
        if lead:  # every expert sees every token: gather the tokens over the expert axes
            x = _constrain_expert(x, ("act_batch", *[None] * (len(lead) - 1), "act_embed"))
        x2 = x.reshape(-1, d)  # [tokens, embed]
        h = jnp.einsum("td,edh->eth", x2, w1.astype(self.dtype)) + b1.astype(self.dtype)[:, None]
        # experts over the expert axes, tokens over the other batch axes
        h = _constrain_expert(activation(self.act)(h), ("act_expert", "act_batch", "act_mlp"))
        y = jnp.einsum("eth,ehf->etf", h, w2.astype(self.dtype)) + b2.astype(self.dtype)[:, None]
        y = _constrain_expert(y, ("act_expert", "act_batch", None))  # [experts, tokens, features]
        out = jnp.einsum("te,etf->tf", g.reshape(-1, e), y)  # [tokens, features]
        return out.reshape(*lead, self.features)


@dataclasses.dataclass(frozen=True)
class MoEConfig(StrictConfig):
    """Sparse top-k MoE hyper-parameters (Qwen2-MoE names in comments)."""

    num_experts: int = 8  # num_experts
    top_k: int = 2  # num_experts_per_tok
    expert_hidden: int = 128  # moe_intermediate_size
    norm_topk_prob: bool = False  # renormalise the top-k router weights to sum to 1
    shared_expert_hidden: int = 0  # shared_expert_intermediate_size; 0 = no shared expert
    capacity_factor: float | None = None  # None or <= 0: capacity = group tokens (no drop)
    group_size: int = 0  # tokens per dispatch group; 0 = one group per batch row
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_positive("MoEConfig", num_experts=self.num_experts, top_k=self.top_k,
                       expert_hidden=self.expert_hidden, init_std=self.init_std)
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig: top_k={self.top_k} must not exceed "
                             f"num_experts={self.num_experts}")
        if self.shared_expert_hidden < 0:
            raise ValueError(f"MoEConfig.shared_expert_hidden must be >= 0 (0 = no shared "
                             f"expert), got {self.shared_expert_hidden}")
        if self.group_size < 0:
            raise ValueError(f"MoEConfig.group_size must be >= 0 (0 = one group per batch "
                             f"row), got {self.group_size}")
        cf = self.capacity_factor
        if cf is not None and (isinstance(cf, bool) or not isinstance(cf, int | float)
                               or not math.isfinite(cf)):
            raise ValueError(f"MoEConfig.capacity_factor must be a finite number or None, "
                             f"got {cf!r}")
        parse_dtype(self.dtype)
        parse_dtype(self.param_dtype)

    def capacity(self, group_tokens: int) -> int:
        """Buffer slots per expert and group: ceil(cf * S * top_k / E), at most S (no drop)."""
        cf = self.capacity_factor
        if cf is None or cf <= 0:
            return group_tokens
        return min(group_tokens, math.ceil(cf * group_tokens * self.top_k / self.num_experts))


def _axes(entry: Any) -> tuple[str, ...]:
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


_BUF = ("act_expert", "act_batch", None)  # [experts, groups, capacity, ...]


def _expert_rules() -> tuple | None:
    """Current logical rules with act_expert first and act_batch minus the expert axes, so
    [E, G, ...] buffers put E on the expert axes and G on the rest of the batch axes."""
    rules = tuple(nn.get_logical_axis_rules())
    if not rules:
        return None
    first = lambda name: next((axes for n, axes in rules if n == name), None)  # noqa: E731
    expert = _axes(first("act_expert"))
    batch = tuple(a for a in _axes(first("act_batch")) if a not in expert)
    return (("act_expert", expert or None), ("act_batch", batch or None)) + rules


def _constrain_expert(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Logical constraint on an [experts, tokens or groups, ...] array under _expert_rules."""
    rules = _expert_rules()
    if rules is None:
        return x
    return nn.with_logical_constraint(x, tuple(names), rules=rules)


def _top_k(probs: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """lax.top_k over the last axis by k argmax passes: the partitioner keeps it sharded over
    the leading axes (it replicates lax.top_k's operand); ties pick the lower index."""
    values, indices = [], []
    for _ in range(k):
        i = jnp.argmax(probs, axis=-1)
        values.append(jnp.take_along_axis(probs, i[..., None], axis=-1)[..., 0])
        indices.append(i)
        probs = jnp.where(jax.nn.one_hot(i, probs.shape[-1], dtype=bool), -jnp.inf, probs)
    return jnp.stack(values, axis=-1), jnp.stack(indices, axis=-1)


def route(probs: jax.Array, top_k: int, capacity: int, norm_topk_prob: bool,
          mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Top-k capacity routing per group.

    probs [G, S, E] float32, mask [G, S] bool (False = padding, never routed) ->
    dispatch [G, S, E, C] (0/1), combine [G, S, E, C] (router weight on the kept slot),
    onehot [G, S, k, E] int32 (the valid assignments), kept [G, S, k] bool (within capacity).
    """
    g, s, e = probs.shape
    top_w, top_i = _top_k(probs, top_k)  # [G, S, k]
    if norm_topk_prob:
        top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    onehot = jax.nn.one_hot(top_i, e, dtype=jnp.int32) * mask[..., None, None]  # [G, S, k, E]
    # slot of each assignment in its expert's buffer: cumulative count in (choice, token) order
    ranked = jnp.swapaxes(onehot, 1, 2).reshape(g, top_k * s, e)  # [G, k * S, E]
    pos = jnp.swapaxes((jnp.cumsum(ranked, axis=1) - 1).reshape(g, top_k, s, e), 1, 2)
    pos = jnp.sum(pos * onehot, axis=-1)  # [G, S, k]
    kept = mask[..., None] & (pos < capacity)
    slot = jax.nn.one_hot(jnp.where(kept, pos, capacity), capacity)  # [G, S, k, C]; dropped: 0
    dispatch = jnp.einsum("gske,gskc->gsec", onehot.astype(slot.dtype), slot)
    # a token picks an expert at most once, so its weight per expert is a plain sum over k
    weight = jnp.sum(onehot * top_w[..., None], axis=2)  # [G, S, E]
    combine = dispatch * weight[..., None]
    return dispatch, combine, onehot, kept


class SparseMoE(nn.Module):
    """Qwen2-MoE sparse block: softmax router -> top-k SwiGLU experts (+ sigmoid-gated shared
    SwiGLU expert), with capacity-based token dispatch that shards over the `expert` axis."""

    config: MoEConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x [batch, seq, embed], mask [batch, seq] (nonzero = valid token) ->
        (y [batch, seq, embed], {"load_balance", "router_z", "dropped_fraction"} scalars)."""
        c = self.config
        dtype, pdtype = parse_dtype(c.dtype), parse_dtype(c.param_dtype)
        b, seq, d = x.shape
        e, k, f = c.num_experts, c.top_k, c.expert_hidden
        s = c.group_size or seq
        if (b * seq) % s:
            raise ValueError(f"SparseMoE: batch * seq = {b} * {seq} tokens do not split into "
                             f"groups of group_size={s}")
        init = nn.initializers.normal(c.init_std)
        router = nn.Dense(e, use_bias=False, dtype=dtype, param_dtype=pdtype,
                          kernel_init=logical_init(init, ("embed", None)), name="router")
        w_gate = self.param("gate_kernel", logical_init(init, ("expert", "embed", "mlp")),
                            (e, d, f), pdtype).astype(dtype)
        w_up = self.param("up_kernel", logical_init(init, ("expert", "embed", "mlp")),
                          (e, d, f), pdtype).astype(dtype)
        w_down = self.param("down_kernel", logical_init(init, ("expert", "mlp", "embed")),
                            (e, f, d), pdtype).astype(dtype)

        x = x.astype(dtype)
        xg = constrain(x.reshape(-1, s, d), ("act_batch", None, "act_embed"))  # [G, S, embed]
        valid = (jnp.ones((b, seq), bool) if mask is None else mask != 0).reshape(-1, s)  # [G, S]
        logits = router(xg)  # [G, S, E]
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        cap = c.capacity(s)
        dispatch, combine, onehot, kept = route(probs, k, cap, c.norm_topk_prob, valid)

        # dispatch locally in the token layout, then one all-to-all into the expert layout
        xe = jnp.einsum("gsec,gsd->gecd", dispatch.astype(dtype), xg)  # [G, E, C, embed]
        xe = constrain(xe, ("act_batch", None, None, "act_embed"))
        xe = _constrain_expert(jnp.swapaxes(xe, 0, 1), _BUF + ("act_embed",))  # [E, G, C, embed]
        h = jax.nn.silu(jnp.einsum("egcd,edf->egcf", xe, w_gate))
        h = _constrain_expert(h * jnp.einsum("egcd,edf->egcf", xe, w_up), _BUF + ("act_mlp",))
        ye = _constrain_expert(jnp.einsum("egcf,efd->egcd", h, w_down), _BUF + ("act_embed",))
        ye = constrain(jnp.swapaxes(ye, 0, 1), ("act_batch", None, None, "act_embed"))
        y = jnp.einsum("gsec,gecd->gsd", combine.astype(dtype), ye)  # [G, S, embed]
        y = constrain(y, ("act_batch", None, "act_embed")).reshape(b, seq, d)

        if c.shared_expert_hidden:
            shared = SwiGLU(c.shared_expert_hidden, init_std=c.init_std, dtype=dtype,
                            param_dtype=pdtype, name="shared_expert")(x)
            gate = nn.Dense(1, use_bias=False, dtype=dtype, param_dtype=pdtype,
                            kernel_init=logical_init(init, ("embed", None)),
                            name="shared_expert_gate")(x)  # [batch, seq, 1]
            y = y + jax.nn.sigmoid(gate) * shared

        # aux losses over valid tokens, float32
        vf = valid.astype(jnp.float32)  # [G, S]
        n_valid = jnp.sum(vf)
        n = jnp.maximum(n_valid, 1.0)
        counts = jnp.sum(onehot, axis=(0, 1, 2)).astype(jnp.float32)  # [E] assignments
        mean_prob = jnp.sum(probs * vf[..., None], axis=(0, 1)) / n  # [E]
        z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # [G, S]
        aux = {
            # E * sum_e f_e * P_e, f_e = assignments to e per token (sums to top_k), as
            # transformers' load_balancing_loss_func
            "load_balance": e * jnp.sum(counts / n * mean_prob),
            "router_z": jnp.sum(z * z * vf) / n,
            "dropped_fraction": (n_valid * k - jnp.sum(kept)) / (n * k),
        }
        return y.astype(dtype), aux


# ---- Hugging Face Qwen2MoeSparseMoeBlock state dict <-> SparseMoE params ----------------------

def sparse_moe_params_from_hf(sd: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Qwen2MoeSparseMoeBlock state dict (fused `experts.gate_up_proj` / `experts.down_proj`
    of transformers 5, or per-expert `experts.{i}.gate_proj.weight` of checkpoint files) ->
    SparseMoE params (numpy float32, unboxed)."""
    get = lambda name: np.asarray(sd[prefix + name], np.float32)  # noqa: E731
    t = lambda w: np.swapaxes(w, -1, -2)  # noqa: E731
    if prefix + "experts.gate_up_proj" in sd:
        gate_up = get("experts.gate_up_proj")  # [E, 2F, embed]
        f = gate_up.shape[1] // 2
        w_gate, w_up, w_down = gate_up[:, :f], gate_up[:, f:], get("experts.down_proj")
    else:
        e = 0
        while f"{prefix}experts.{e}.gate_proj.weight" in sd:
            e += 1
        if not e:
            raise ValueError(f"no experts under {prefix!r}: expected experts.gate_up_proj or "
                             f"experts.0.gate_proj.weight")
        stack = lambda n: np.stack([get(f"experts.{i}.{n}.weight") for i in range(e)])  # noqa: E731
        w_gate, w_up, w_down = stack("gate_proj"), stack("up_proj"), stack("down_proj")
    params: dict[str, Any] = {"router": {"kernel": t(get("gate.weight"))},
                              "gate_kernel": t(w_gate), "up_kernel": t(w_up),
                              "down_kernel": t(w_down)}
    if prefix + "shared_expert.gate_proj.weight" in sd:
        params["shared_expert"] = {n: {"kernel": t(get(f"shared_expert.{n}_proj.weight"))}
                                   for n in ("gate", "up", "down")}
        params["shared_expert_gate"] = {"kernel": t(get("shared_expert_gate.weight"))}
    return params


def sparse_moe_params_to_hf(params: Mapping[str, Any], prefix: str = "",
                            per_expert: bool = False) -> dict[str, np.ndarray]:
    """SparseMoE params -> Qwen2MoeSparseMoeBlock state dict (fused 3-D experts, or the
    per-expert checkpoint layout with per_expert=True); numpy float32."""
    get = lambda *path: np.asarray(_at(params, path), np.float32)  # noqa: E731
    t = lambda w: np.swapaxes(w, -1, -2)  # noqa: E731
    w_gate, w_up, w_down = t(get("gate_kernel")), t(get("up_kernel")), t(get("down_kernel"))
    out = {"gate.weight": t(get("router", "kernel"))}
    if per_expert:
        for i in range(w_gate.shape[0]):
            for n, w in (("gate_proj", w_gate), ("up_proj", w_up), ("down_proj", w_down)):
                out[f"experts.{i}.{n}.weight"] = w[i]
    else:
        out["experts.gate_up_proj"] = np.concatenate([w_gate, w_up], axis=1)  # [E, 2F, embed]
        out["experts.down_proj"] = w_down  # [E, embed, F]
    if "shared_expert" in params:
        for n in ("gate", "up", "down"):
            out[f"shared_expert.{n}_proj.weight"] = t(get("shared_expert", n, "kernel"))
        out["shared_expert_gate.weight"] = t(get("shared_expert_gate", "kernel"))
    return {prefix + k: np.ascontiguousarray(v) for k, v in out.items()}


def _at(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
    for key in path:
        tree = tree[key]
    return nn.unbox(tree)
