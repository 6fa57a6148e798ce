"""OpenOmni speech-generator state dicts (.bin / .pt / safetensors) <-> SpeechGenerator params.

Key layout (SEEDS.md, relative to a prefix such as `speech_generator.` or
`model.speech_generator.`, auto-detected): llm_embedding, input_proj.gate.fc,
input_proj.experts.{e}.fc1|fc2, fusion.layers.{l}.0.{norm_text,norm_image,to_q,to_kv,to_out},
fusion.layers.{l}.1.{0,1,3}, fusion.norm, llm.model.* (a Qwen2ForCausalLM state dict, through
convert.qwen2), llm_decoder. torch Linear weights are [out, in].
Not in the released code, so our guess (the names tests/speech/torch_ref.py uses): the AR
mode's ar_embedding / unit_embedding and the plain-MLP expansion's input_proj.{0,2}
(nn.Sequential). The sparse-MoE expansion has no known layout and is refused.
Tensors are read as float32 (bf16 files included); exports are float32.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from omni_jax.convert import io
from omni_jax.convert.qwen2 import _hf_shapes, config_from_hf, params_from_hf, params_to_hf
from omni_jax.convert.tree import flatten, unflatten
from omni_jax.llm.config import LLMConfig
from omni_jax.speech.config import SpeechGenConfig

PREFIX = "speech_generator."  # the default prefix written on export
ANCHORS = ("llm_decoder.weight", "llm_embedding.weight")  # keys that locate the prefix
EMBED, LM_HEAD = "llm.model.model.embed_tokens.weight", "llm.model.lm_head.weight"
NATIVE_KIND = "openomni_speech"
_TORCH_EXT = (".bin", ".pt", ".pth", ".ckpt")
_NOT_WEIGHTS = ("training_args", "optimizer", "scheduler", "rng_state", "scaler")
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


@dataclasses.dataclass(frozen=True)
class _Entry:
    key: str  # torch key, relative to the prefix
    path: str  # our "/"-joined param path
    ours: tuple[int, ...]  # our leaf shape (one expert's slice when `expert` is set)
    t: int = 0  # 0: copied; k > 0: a Linear weight whose input is our first k dims
    expert: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The torch tensor's shape."""
        if not self.t:
            return self.ours
        return (int(np.prod(self.ours[self.t:])), int(np.prod(self.ours[:self.t])))


def _check_supported(c: SpeechGenConfig) -> None:
    if c.segment_positions:
        raise ValueError("OpenOmni import/export: segment_positions=True adds a table "
                         "(segment_pos) that OpenOmni's generator does not have; use "
                         "segment_positions=False")


def _entries(c: SpeechGenConfig) -> list[_Entry]:
    """Every non-decoder tensor of the generator: torch key, our path, shapes."""
    if c.moe == "sparse":
        raise ValueError("OpenOmni import/export: the sparse-MoE expansion has no known "
                         "state-dict layout (supported: moe='soft', the released one, and 'mlp')")
    _check_supported(c)
    h, n, hid, f = c.llm_hidden, c.width, c.expert_hidden, c.expansion * c.width
    heads, hd, ff = c.fusion_heads, c.fusion_head_dim, c.fusion_ff_mult * c.width
    E = _Entry
    out = [E("llm_embedding.weight", "llm_embedding/embedding", (2, h))]
    if c.moe == "soft":
        out += [E("input_proj.gate.fc.weight", "input_proj/gate/kernel", (h, c.num_experts), 1),
                E("input_proj.gate.fc.bias", "input_proj/gate/bias", (c.num_experts,))]
        for e in range(c.num_experts):
            k = f"input_proj.experts.{e}."
            out += [E(k + "fc1.weight", "input_proj/fc1_kernel", (h, hid), 1, e),
                    E(k + "fc1.bias", "input_proj/fc1_bias", (hid,), 0, e),
                    E(k + "fc2.weight", "input_proj/fc2_kernel", (hid, f), 1, e),
                    E(k + "fc2.bias", "input_proj/fc2_bias", (f,), 0, e)]
    else:  # our guess: nn.Sequential(Linear, ReLU, Linear)
        out += [E("input_proj.0.weight", "input_proj/fc1/kernel", (h, hid), 1),
                E("input_proj.0.bias", "input_proj/fc1/bias", (hid,)),
                E("input_proj.2.weight", "input_proj/fc2/kernel", (hid, f), 1),
                E("input_proj.2.bias", "input_proj/fc2/bias", (f,))]
    norm = lambda key, path: [E(key + ".weight", path + "/scale", (n,)),  # noqa: E731
                              E(key + ".bias", path + "/bias", (n,))]
    for i in range(c.fusion_layers):
        a, b, p = f"fusion.layers.{i}.0.", f"fusion.layers.{i}.1.", f"fusion/layers_{i}/"
        out += norm(a + "norm_image", p + "attn/norm_q") + norm(a + "norm_text", p + "attn/norm_kv")
        out += [E(a + "to_q.weight", p + "attn/to_q/kernel", (n, heads, hd), 1),
                E(a + "to_kv.weight", p + "attn/to_kv/kernel", (n, 2, heads, hd), 1),
                E(a + "to_out.weight", p + "attn/to_out/kernel", (heads, hd, n), 2)]
        out += norm(b + "0", p + "ff/norm")
        out += [E(b + "1.weight", p + "ff/fc1/kernel", (n, ff), 1),
                E(b + "3.weight", p + "ff/fc2/kernel", (ff, n), 1)]
    out += norm("fusion.norm", "fusion/norm")
    out += [E("llm_decoder.weight", "llm_decoder/kernel", (n, c.num_outputs), 1),
            E("llm_decoder.bias", "llm_decoder/bias", (c.num_outputs,))]
    if c.mode == "ar":  # our guess
        out += [E("ar_embedding.weight", "ar_embedding/embedding", (2, n)),
                E("unit_embedding.weight", "unit_embedding/embedding", (c.num_outputs, n))]
    return out


def expected_shapes(config: SpeechGenConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the state dict (relative to the prefix) and its shape."""
    shapes = {e.key: e.shape for e in _entries(config)}
    shapes.update({"llm.model." + k: s for k, s in _hf_shapes(config.decoder).items()})
    shapes.setdefault(LM_HEAD, shapes[EMBED])  # a Qwen2ForCausalLM state dict always has it
    return shapes


# ------------------------------------------------------------------ prefix and shapes

def detect_prefix(keys: Iterable[str]) -> str:
    """The text in front of the generator's keys ('' if bare); ValueError when ambiguous."""
    found = {k[:len(k) - len(a)] for k in keys for a in ANCHORS
             if k.endswith(a) and (k == a or k[:len(k) - len(a)].endswith("."))}
    if len(found) > 1:
        raise ValueError(f"OpenOmni checkpoint: several speech generators, prefixes "
                         f"{sorted(found)}; pass prefix= to choose one")
    return found.pop() if found else ""


def select_generator(tensors: Mapping[str, Any], prefix: str | None = None
                     ) -> tuple[dict[str, Any], str, int]:
    """(the generator's tensors with `prefix` removed, the prefix, keys left out). prefix=None
    detects it; keys outside a non-empty prefix (the rest of an OpenOmni model) are left out."""
    p = detect_prefix(tensors) if prefix is None else prefix
    sel = {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
    if not sel:
        raise ValueError(f"OpenOmni checkpoint: no key starts with prefix {p!r} (the file's "
                         f"generator prefix looks like {detect_prefix(tensors)!r})")
    return sel, p, len(tensors) - len(sel)


def _layer_count(keys: Iterable[str], pattern: str) -> int | None:
    idx = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(idx) + 1 if idx else None


def _implied(s: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """What the shapes {key: shape} say about the config, where they tell."""
    get = lambda k, i: s[k][i] if k in s and len(s[k]) > i else None  # noqa: E731
    ratio = lambda k: get(k, 0) // n if get(k, 0) and n else None  # noqa: E731
    n = get("llm_decoder.weight", 1) or get("fusion.norm.weight", 0)
    soft = "input_proj.gate.fc.weight" in s
    fc1, fc2 = (("input_proj.experts.0.fc1.weight", "input_proj.experts.0.fc2.weight") if soft
                else ("input_proj.0.weight", "input_proj.2.weight"))
    q0, dec = "fusion.layers.0.", "llm.model.model.layers.0."
    out = {"mode": "ar" if "unit_embedding.weight" in s else "ctc",
           "moe": "soft" if soft else "mlp" if "input_proj.0.weight" in s else None,
           "llm_hidden": get("llm_embedding.weight", 1), "width": n,
           "unit_vocab": get("llm_decoder.weight", 0) and get("llm_decoder.weight", 0) - 1,
           "num_experts": _layer_count(s, r"input_proj\.experts\.(\d+)\."),
           "expert_hidden": get(fc1, 0), "expansion": ratio(fc2),
           "fusion_layers": _layer_count(s, r"fusion\.layers\.(\d+)\."),
           "fusion_heads*fusion_head_dim": get(q0 + "0.to_q.weight", 0),
           "fusion_ff_mult": ratio(q0 + "1.1.weight"), "decoder.vocab_size": get(EMBED, 0),
           "decoder.num_layers": _layer_count(s, r"llm\.model\.model\.layers\.(\d+)\."),
           "decoder.intermediate_size": get(dec + "mlp.gate_proj.weight", 0),
           "decoder.num_heads*head_dim": get(dec + "self_attn.q_proj.weight", 0),
           "decoder.num_kv_heads*head_dim": get(dec + "self_attn.k_proj.weight", 0)}
    return {k: v for k, v in out.items() if v is not None}


def implied_config(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """What a (prefix-free) state dict's shapes say about the config (and whether its LM head
    equals the token table: decoder.tie_word_embeddings)."""
    out = _implied({k: tuple(np.shape(v)) for k, v in tensors.items()})
    if LM_HEAD in tensors and EMBED in tensors:
        out["decoder.tie_word_embeddings"] = bool(np.array_equal(_np(tensors[LM_HEAD]),
                                                                 _np(tensors[EMBED])))
    return out


def config_from_openomni(tensors: Mapping[str, Any], llm_config: Mapping[str, Any] | None = None,
                         fusion_heads: int = 16, decoder_head_dim: int = 64,
                         **overrides: Any) -> SpeechGenConfig:
    """A SpeechGenConfig from a (prefix-free) state dict's shapes. Shapes give head counts
    times head dims only: pass fusion_heads (16 released) and decoder_head_dim (64, Qwen2.5-
    0.5B), or the decoder's Qwen2 config.json as llm_config. Unseen settings (eps, RoPE theta,
    upsample) keep SpeechGenConfig's / the paper decoder's defaults unless overridden."""
    im = implied_config(tensors)
    need = ("llm_hidden", "width", "unit_vocab", "moe", "fusion_layers",
            "fusion_heads*fusion_head_dim", "decoder.vocab_size", "decoder.num_layers")
    if [k for k in need if k not in im]:
        raise ValueError(f"config_from_openomni: the state dict lacks the tensors that give "
                         f"{[k for k in need if k not in im]}")
    tied = im.get("decoder.tie_word_embeddings", True)
    if llm_config is not None:
        decoder = config_from_hf({**llm_config, "tie_word_embeddings": tied})
    else:
        hd = decoder_head_dim
        decoder = LLMConfig(vocab_size=im["decoder.vocab_size"], hidden_size=im["width"],
                            intermediate_size=im["decoder.intermediate_size"],
                            num_layers=im["decoder.num_layers"],
                            num_heads=im["decoder.num_heads*head_dim"] // hd,
                            num_kv_heads=im["decoder.num_kv_heads*head_dim"] // hd, head_dim=hd,
                            rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                            tie_word_embeddings=tied, qkv_bias=True)
    kw = dict(mode=im["mode"], moe=im["moe"], llm_hidden=im["llm_hidden"],
              unit_vocab=im["unit_vocab"], expansion=im.get("expansion", 4),
              num_experts=im.get("num_experts", 4), expert_hidden=im.get("expert_hidden"),
              fusion_layers=im["fusion_layers"], fusion_heads=fusion_heads,
              fusion_head_dim=im["fusion_heads*fusion_head_dim"] // fusion_heads,
              fusion_ff_mult=im.get("fusion_ff_mult", 4), decoder=decoder)
    return SpeechGenConfig(**{**kw, **overrides})


# ------------------------------------------------------------------ state dict <-> params

def _np(v: Any) -> np.ndarray:
    """numpy float32 view of a numpy array or a torch tensor (bf16 included)."""
    if hasattr(v, "detach"):  # torch, imported by the caller
        v = v.detach().cpu()
        return (v.float() if str(v.dtype) == "torch.bfloat16" else v).numpy()
    return np.asarray(v)


def params_from_openomni(config: SpeechGenConfig, tensors: Mapping[str, Any],
                         prefix: str | None = None, keep_lm_head: bool = True) -> dict[str, Any]:
    """State dict (numpy or torch) -> {"params": ...}. prefix=None detects it. Everything wrong
    (missing / unexpected keys, wrong shapes, what the shapes imply, a tied head that differs
    from the embedding) comes in one ValueError. keep_lm_head keeps an untied decoder's unused
    LM head (params["llm"]["lm_head"]) so an export gives the file back."""
    entries = _entries(config)
    t, p, _ = select_generator(tensors, prefix)
    problems, expected = [], expected_shapes(config)
    if config.decoder.tie_word_embeddings and LM_HEAD not in t:
        expected.pop(LM_HEAD)  # tied: the head may be left out
    try:
        io.check_tensors(t, expected, "OpenOmni speech generator",
                         ignore_unexpected=("llm.model.model.rotary_emb.",))
    except ValueError as e:
        problems.append(str(e))
    im, have = implied_config(t), _implied(expected_shapes(config))
    diff = [f"{k}: file {im[k]}, config {have[k]}" for k in have if k in im and im[k] != have[k]]
    if config.decoder.tie_word_embeddings and im.get("decoder.tie_word_embeddings") is False:
        diff.append(f"decoder.tie_word_embeddings: file False ({LM_HEAD} differs from "
                    f"{EMBED}), config True")
    if diff:
        problems.append("the file implies another config (" + "; ".join(diff) + ")")
    if problems:
        raise ValueError(f"prefix {p!r}: " + "; ".join(problems))
    flat: dict[str, Any] = {}
    for e in entries:
        a = _np(t[e.key]).astype(np.float32)
        a = a.T.reshape(e.ours) if e.t else a
        if e.expert is None:
            flat[e.path] = a
        else:
            flat.setdefault(e.path, [None] * config.num_experts)[e.expert] = a
    flat = {k: np.stack(v) if isinstance(v, list) else v for k, v in flat.items()}
    params = unflatten(flat)
    llm = {k[len("llm.model."):]: _np(v) for k, v in t.items() if k.startswith("llm.model.")}
    params["llm"] = params_from_hf(config.decoder, llm)["params"]
    if not keep_lm_head:
        params["llm"].pop("lm_head", None)
    return {"params": params}


def _unwrap(variables: Mapping[str, Any]) -> dict[str, Any]:
    from flax.core import meta

    v = meta.unbox(dict(variables))
    return dict(v["params"]) if set(v) == {"params"} else v


def _param_shapes(config: SpeechGenConfig) -> dict[str, tuple[int, ...]]:
    """Our tree's leaf shapes, from an abstract init (no compute)."""
    import jax
    import jax.numpy as jnp
    from flax.core import meta

    from omni_jax.speech.generator import SpeechGenerator

    h = config.llm_hidden
    args = (jnp.zeros((1, 4, h)), jnp.ones((1, 4), bool), jnp.ones((1, 2), jnp.int32),
            jnp.ones((1, 2), bool), jnp.ones((1, 3), jnp.int32), jnp.ones((1, 3), bool))
    abstract = jax.eval_shape(SpeechGenerator(config).init, jax.random.key(0), *args)
    return {k: tuple(v.shape) for k, v in flatten(meta.unbox(abstract)["params"]).items()}


def params_to_openomni(config: SpeechGenConfig, variables: Mapping[str, Any],
                       prefix: str = PREFIX) -> dict[str, np.ndarray]:
    """{"params": ...} (or the bare tree) -> OpenOmni state dict (numpy float32), prefixed."""
    _check_supported(config)
    params = _unwrap(variables)
    flat = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
    io.check_tensors(flat, _param_shapes(config), "SpeechGenerator params (export)",
                     ignore_unexpected=("llm/lm_head/",))
    d = config.decoder
    if not d.tie_word_embeddings and "llm/lm_head/kernel" not in flat:
        raise ValueError("OpenOmni export: the decoder is untied but params['llm'] has no "
                         "'lm_head' (import with keep_lm_head=True to keep it)")
    out: dict[str, np.ndarray] = {}
    for e in _entries(config):
        a = flat[e.path] if e.expert is None else flat[e.path][e.expert]
        out[e.key] = a.reshape(int(np.prod(e.ours[:e.t])), -1).T if e.t else a
    llm = dict(params["llm"])
    if d.tie_word_embeddings:
        llm.pop("lm_head", None)
    for k, v in params_to_hf(d, {"params": llm}).items():
        out["llm.model." + k] = v
    out.setdefault(LM_HEAD, out[EMBED].copy())  # tied: written as Qwen2ForCausalLM does
    return {prefix + k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


# ------------------------------------------------------------------ files

def _read_safetensors(fp: str) -> dict[str, np.ndarray]:
    """A safetensors file parsed here (numpy has no bfloat16: BF16 tensors become float32)."""
    try:
        with open(fp, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(size))
        raw = np.memmap(fp, np.uint8, "r", offset=8 + size)
        items = [(k, m["dtype"], m["shape"], raw[slice(*m["data_offsets"])])
                 for k, m in header.items() if k != "__metadata__"]
    except Exception as e:  # short file, bad JSON, bad offsets
        raise ValueError(f"{fp}: cannot read safetensors file ({e})") from e
    out = {}
    for k, dtype, shape, b in items:
        if dtype not in _ST_DTYPES and dtype != "BF16":
            raise ValueError(f"{fp}: tensor {k!r} has unsupported dtype {dtype}")
        a = ((b.view(np.uint16).astype(np.uint32) << 16).view(np.float32) if dtype == "BF16"
             else np.array(b.view(_ST_DTYPES[dtype])))
        out[k] = a.reshape(shape)
    return out


def _read_torch(fp: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ValueError(f"{fp}: reading torch checkpoints needs PyTorch (an optional "
                         f"dependency: pip install torch), or convert it to safetensors") from e
    try:
        obj = torch.load(fp, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of many kinds
        raise ValueError(f"{fp}: cannot read torch checkpoint ({e})") from e
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and len(obj) <= 4:
            obj = obj[key]
    bad = sorted(k for k, v in obj.items() if not torch.is_tensor(v)) if isinstance(obj, dict) \
        else ["<not a dict>"]
    if bad:
        raise ValueError(f"{fp}: not a state dict of tensors (non-tensor entries {bad[:5]})")
    return {k: _np(v) for k, v in obj.items()}


def _read_file(fp: str) -> dict[str, np.ndarray]:
    if fp.endswith(".safetensors"):
        return _read_safetensors(fp)
    if fp.endswith(_TORCH_EXT):
        return _read_torch(fp)
    raise ValueError(f"{fp}: unknown checkpoint type (expected .safetensors or "
                     f"{'/'.join(_TORCH_EXT)})")


def _dir_files(path: str) -> list[str]:
    for index in (io.INDEX_NAME, "pytorch_model.bin.index.json"):
        fp = os.path.join(path, index)
        if os.path.isfile(fp):
            with open(fp) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{fp}: expected a 'weight_map' object")
            files = [os.path.join(path, n) for n in sorted(set(weight_map.values()))]
            lost = [f for f in files if not os.path.isfile(f)]
            if lost:
                raise ValueError(f"{path!r}: shards named in {index} are missing: {lost}")
            return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    files = files or sorted(f for f in glob.glob(os.path.join(path, "*"))
                            if f.endswith(_TORCH_EXT)
                            and not os.path.basename(f).startswith(_NOT_WEIGHTS))
    if not files:
        raise ValueError(f"{path!r}: no .safetensors or torch (.bin/.pt) weight files")
    return files


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """All tensors of a file (.safetensors, .bin/.pt via torch.load(weights_only=True)) or a
    directory (an index json's shards, else every weight file in it)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"OpenOmni checkpoint {path!r} does not exist")
    out: dict[str, np.ndarray] = {}
    for fp in _dir_files(path) if os.path.isdir(path) else [path]:
        part = _read_file(fp)
        dup = sorted(set(part) & set(out))
        if dup:
            raise ValueError(f"{fp}: keys also in another shard: {dup[:5]}")
        out.update(part)
    return out


def import_openomni(path: str, config: SpeechGenConfig, prefix: str | None = None,
                    keep_lm_head: bool = True) -> dict[str, Any]:
    """Read a file or directory (see read_state_dict) -> {"params": ...}."""
    return params_from_openomni(config, read_state_dict(path), prefix, keep_lm_head)


def export_openomni(config: SpeechGenConfig, variables: Mapping[str, Any], out_path: str,
                    prefix: str = PREFIX) -> None:
    """Write .safetensors (no torch needed) or .bin / .pt (torch.save of a state dict)."""
    out_path = os.fspath(out_path)
    if not out_path.endswith((".safetensors", *_TORCH_EXT)):
        raise ValueError(f"export_openomni: {out_path!r} must end in .safetensors or "
                         f"{'/'.join(_TORCH_EXT)}")
    tensors = params_to_openomni(config, variables, prefix)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    if out_path.endswith(".safetensors"):
        save_file(tensors, out_path, metadata={"format": "pt"})
        return
    try:
        import torch
    except ImportError as e:
        raise ValueError("export_openomni: .bin / .pt output needs PyTorch; write "
                         ".safetensors instead") from e
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, out_path)


def load_native_openomni(path: str) -> tuple[SpeechGenConfig, dict[str, Any]]:
    """Read a native dir written by registry.save_native(kind=NATIVE_KIND)."""
    from omni_jax.convert.registry import read_native

    meta, params = read_native(path, NATIVE_KIND)
    return SpeechGenConfig.from_dict(meta["config"]), params
