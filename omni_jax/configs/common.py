"""Shared pieces of the model and recipe configs: arg parsing, towers per system, stage and
trainer defaults. Recipes (omni_jax/configs/recipes/*.py) import this module; so does the CLI.

A recipe is an ml_collections ConfigDict:
  recipe, model_name, model (OmniConfig.from_dict format), data_root, tokenizer, media,
  train (trainer defaults: seed, mesh, logical rules, checkpointing, logging),
  stage_order [names], stages.<name> (see `stage`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from ml_collections import ConfigDict, FieldReference

MODEL_NAMES = ("tiny", "qwen05b", "qwen7b")
FLAVORS = ("mlp", "ola", "capybara", "openomni", "ovis", "xvila")
# Manifest names of the data sources (the fixture set of omni_jax.data.fixtures writes exactly
# these; a full dataset provides the same names at scale). Relative paths resolve against
# config.data_root.
SOURCES = ("image_caption", "image_qa", "video_qa", "speech_asr", "text_chat",
           "speech_response",  # answers with their spoken units (OpenOmni stage IV)
           "speech_dpo",  # answers with chosen (emotional) / rejected (neutral) units (stage V)
           "spoken_image_qa",  # image + the question as speech (omni_digits)
           "video_spoken_qa")  # video + the question as speech (Ola's cross-modal stage)
# media the records of each source hold (data budgets ship only these; recipes/data.py)
SOURCE_MODALITIES = {"image_caption": ("image",), "image_qa": ("image",),
                     "video_qa": ("video",), "speech_asr": ("audio",), "text_chat": (),
                     "speech_response": ("image",), "speech_dpo": ("image",),
                     "spoken_image_qa": ("image", "audio"), "video_spoken_qa": ("video", "audio")}
# speech generator preset per model size (omni_jax.speech.config.speech_preset)
SPEECH_PRESETS = {"tiny": "tiny", "qwen05b": "paper", "qwen7b": "paper"}


def parse_arg(arg: str | None, defaults: Mapping[str, str]) -> dict[str, str]:
    """'model=tiny,order=paper' -> {"model": "tiny", "order": "paper", ...defaults}.

    ValueError for a malformed item or a key not in defaults.
    """
    out = dict(defaults)
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"config arg item {item!r} is not key=value (e.g. 'model=tiny')")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r}; expected a subset of {sorted(defaults)}")
        out[key] = value
    return out


def choose(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(allowed)}")
    return value


def load_model(name: str, flavor: str = "mlp") -> ConfigDict:
    """omni_jax/configs/models/<name>.py get_config(flavor): an OmniConfig.from_dict dict."""
    choose("model", name, MODEL_NAMES)
    return importlib.import_module(f"omni_jax.configs.models.{name}").get_config(flavor)


def towers(flavor: str, width: int, *, siglip: Mapping[str, Any], whisper: Mapping[str, Any],
           sizes: Mapping[str, Any], beats: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """image / video / audio (/ highway) tower dicts of one system's flavor for an LLM `width`.

    sizes: image_size (SigLIP default input side), ola_image_size (Ola's high-res canvas),
    ola_lowres_size (Ola's low-res canvas; absent: one view per image), ola_video_size
    (default: the low-res side, else ola_image_size), capybara_image_size,
    openomni_vit (a dict overriding siglip for the CLIP-L-sized tower), video_frames,
    audio_frames (mel frames per 30 s-style chunk), audio_chunks (Ola: chunks per item),
    speech_hidden, ovis_vocab, highway_dim. beats: the BEATs config of Ola's dual audio tower.
    """
    choose("model flavor", flavor, FLAVORS)
    siglip = dict(siglip)
    side = sizes["image_size"]
    out: dict[str, Any] = {}
    # speech projector (stack k frames -> Linear-ReLU-Linear); OpenOmni / default: k=5
    speech = {"in_dim": whisper["d_model"], "out_dim": width,
              "hidden_dim": sizes["speech_hidden"], "stack": 5, "special_vectors": False}
    video_adapter, video_side = "mlp", None  # video_side None: the image tower's side
    if flavor == "ola":
        # Ola's Oryx-ViT (SigLIP-so400m-shaped): patch 16, a 128 x 128 position grid resized
        # bilinearly per image, exact GELU, no post-LN (SEEDS "Ola's released checkpoint");
        # LGAP projector with begin/sep/newline/end vectors; speech: stack 10 + vectors.
        siglip.update(patch_size=16, pos_interp="bilinear", hidden_act="gelu",
                      use_post_layernorm=False, layer_norm_eps=1e-6,
                      image_size=16 * sizes.get("ola_pos_grid", 128))
        # Two views per image (SEEDS): low-res on an ola_lowres_size canvas, high-res on the
        # ola_image_size canvas (both static: each view fitted and gray-padded, data.omni)
        side, video_adapter = sizes["ola_image_size"], "ola_lgap"
        image = {"adapter": "ola_lgap", "adapter_config": {"out_dim": width}}
        low = sizes.get("ola_lowres_size")
        if low:
            image["lowres_size"] = [low, low]
        video_side = sizes.get("ola_video_size", low or side)
        speech.update(stack=10, special_vectors=True, remainder="drop")
    elif flavor == "capybara":
        # SigLIP + 2-layer MLP with 2x2 bilinear reduction (32x32 -> 16x16 per tile); pos grid
        # interpolated to the larger input; audio: Whisper + 1-layer MLP.
        side, video_adapter = sizes["capybara_image_size"], "mlp_2x2"
        image = {"adapter": "mlp_2x2", "adapter_config": {"out_dim": width}}
        speech.update(stack=1)  # paper: 1-layer MLP; ours keeps Linear-ReLU-Linear
    elif flavor == "openomni":
        # CLIP-L/14-336-sized tower, penultimate layer, no post-LN; LLaVA-NeXT row newlines.
        siglip.update(sizes["openomni_vit"], select_layer=-2, use_post_layernorm=False)
        side = siglip["image_size"]
        image = {"adapter": "mlp", "adapter_config": {"out_dim": width, "newline": "row"}}
    elif flavor == "ovis":
        image = {"adapter": "ovis_vte",
                 "adapter_config": {"out_dim": width, "vocab_size": sizes["ovis_vocab"]}}
    else:  # mlp, xvila
        image = {"adapter": "mlp", "adapter_config": {"out_dim": width}}
    out["image"] = {"encoder": "siglip", "encoder_config": siglip, "image_size": [side, side],
                    **image}
    if flavor == "ovis":  # Ovis: images only
        return out
    if flavor != "openomni":  # OpenOmni has no video tower
        adapter_config = dict(image["adapter_config"]) if video_adapter == image["adapter"] else {
            "out_dim": width}
        vs = video_side or side
        out["video"] = {"encoder": "shared:image", "adapter": video_adapter,
                        "adapter_config": adapter_config, "image_size": [vs, vs],
                        "num_frames": sizes["video_frames"]}
    if flavor == "ola":  # Whisper ++ BEATs on channels, chunked audio (newline per chunk)
        speech["in_dim"] = whisper["d_model"] + beats["encoder_embed_dim"]
        out["audio"] = {"encoder": "ola_audio", "adapter": "speech", "adapter_config": speech,
                        "encoder_config": {"whisper": dict(whisper), "beats": dict(beats),
                                           "chunk_seconds": sizes["audio_frames"] / 100},
                        "num_chunks": sizes["audio_chunks"], "num_frames": sizes["audio_frames"]}
    else:
        out["audio"] = {"encoder": "whisper", "encoder_config": dict(whisper),
                        "adapter": "speech", "adapter_config": speech,
                        "num_frames": sizes["audio_frames"]}
    if flavor == "xvila":  # visual embedding highway to the (later) visual decoder
        # init_std ~ 1 / sqrt(encoder width): 0.02 shrinks the patch features ~12x at width 16
        out["highway"] = {"out_dim": sizes["highway_dim"],
                          "init_std": round(siglip["hidden_size"] ** -0.5, 4)}
    return out


def lr_group(pattern: str, lr_scale: float) -> dict[str, Any]:
    return {"pattern": pattern, "lr_scale": lr_scale}


def mixture(**weights: float) -> dict[str, dict[str, Any]]:
    """source name -> {kind: jsonl, path: <name>.jsonl (relative to data_root), weight}."""
    unknown = sorted(set(weights) - set(SOURCES))
    if unknown:
        raise ValueError(f"unknown data sources {unknown}; expected a subset of {SOURCES}")
    return {n: {"kind": "jsonl", "path": f"{n}.jsonl", "weight": float(w),
                "modalities": SOURCE_MODALITIES[n]} for n, w in weights.items()}


def stage(*, description: str, trainable: Sequence[str], sources: Mapping[str, Any], lr: float,
          batch_size: int, steps: int | None = None, epochs: float | None = None,
          lr_groups: Mapping[str, Any] | None = None, losses: Mapping[str, Any] | None = None,
          warmup_ratio: float = 0.03, schedule: str = "cosine", weight_decay: float = 0.0,
          clip_norm: float = 1.0, seq_len: int = 2048, packing: bool = True,
          speech: Mapping[str, int] | None = None,
          init_from: Mapping[str, str] | None = None) -> ConfigDict:
    """One stage: data mixture, trainable regexes, LR groups, losses, schedule, length, batch.

    Exactly one of steps / epochs (epochs -> steps = ceil(epochs * records / batch_size)).
    optim is an OptimConfig dict; its warmup_steps (0 here) is set from warmup_ratio * steps.
    speech: speech-out stages' static target lengths {text_len, units_len} (no packing).
    init_from: {module: source module}, top-level parameter subtrees of the same structure,
    e.g. {"video_adapter": "image_adapter"}: the stage starts the module from the source's
    values at the end of the previous stage (not on resume: a checkpoint holds its own).
    """
    if speech and packing:
        raise ValueError(f"stage {description!r}: speech-out targets need packing=False")
    if (steps is None) == (epochs is None):
        raise ValueError(f"stage {description!r}: give exactly one of steps / epochs")
    return ConfigDict({
        "description": description,
        "trainable": tuple(trainable),
        "lr_groups": dict(lr_groups or {}),
        "losses": dict(losses or {"ce": 1.0}),
        "data": {"sources": dict(sources), "seq_buckets": (seq_len,), "packing": packing,
                 "seq_len": seq_len, "seed": 0, "speech": dict(speech or {})},
        "optim": {"lr": lr, "schedule": schedule, "warmup_steps": 0, "end_lr_ratio": 0.0,
                  "weight_decay": weight_decay, "clip_norm": clip_norm},
        "warmup_ratio": warmup_ratio,
        "steps": FieldReference(steps, field_type=int),
        "epochs": FieldReference(epochs, field_type=float),
        "batch_size": batch_size,
        # media items per (process-local) batch, e.g. {"image": 64}, overriding the budget of
        # omni_jax/recipes/data.py (only the modalities of the mixture; batch x items per
        # record, or batch * (seq_len // tokens per item) with packing). A batch needing more
        # items than its budget is an error.
        "media_items": {},
        "init_from": dict(init_from or {}),
    })


def speech_generator(model_name: str, llm: Mapping[str, Any], mode: str = "ctc") -> dict:
    """The speech generator config dict (SpeechGenConfig) of a model size: OpenOmni's
    896-wide Qwen2.5-0.5B-shaped generator for real sizes, a tiny one for model=tiny (its text
    embedding as wide as the LLM's vocabulary)."""
    from omni_jax.speech.config import speech_preset

    choose("model", model_name, MODEL_NAMES)
    kw = {"text_vocab": int(llm["vocab_size"])} if model_name == "tiny" else {}
    return speech_preset(SPEECH_PRESETS[model_name], int(llm["hidden_size"]), mode=mode,
                         **kw).to_dict()


def tiny_overrides(stages: ConfigDict, steps: int = 4, batch_size: int = 4,
                   seq_len: int = 128) -> None:
    """Make every stage a few-step, small-batch run (model=tiny: tests and the demo): padded
    rows of one fixture record each, so the media budgets are batch x items per record."""
    for name in stages:
        s = stages[name]
        s.steps, s.epochs, s.batch_size = steps, None, batch_size
        s.data.seq_len, s.data.seq_buckets, s.data.packing = seq_len, (seq_len,), False
        if s.data.speech:
            s.data.speech = {"text_len": 32, "units_len": 256}


def trainer_defaults() -> ConfigDict:
    """Trainer settings shared by every stage (omni_jax.train.trainer.default_config's keys
    minus the per-stage ones: batch_size, steps, optim, stage), plus the model's
    fused_head_chunk. Override with --config.train.<key>=..."""
    return ConfigDict({
        "seed": 0,
        "grad_accum": 1,
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1},  # -1: remaining devices
        "rules": (),  # ((logical, mesh axes), ...); empty: parallel.rules.DEFAULT_RULES
        "checkpoint": {"every_steps": 500, "keep": 3, "async_save": True},
        "log_every": 10,
        "eval_every": 0,  # 0: no periodic eval
        "eval_batches": 1,
        "peak_flops": 0.0,  # per device FLOP/s for MFU; 0: measure a matmul once
        "progress_bar": True,
        "tensorboard": True,
        # LM head + CE fused over token chunks (train.fused_ce): no [tokens, vocab] logits,
        # 1.5-2x faster steps on CPU (bench/README.md); None: plain logits
        "fused_head_chunk": FieldReference(256, field_type=int),
        # --dry_run's scale plan: per-device bytes on a mesh of this many devices (0: the ones
        # here), shaped by `mesh` (e.g. data=8, fsdp=8 for a v5p-64 / 8 nodes of 8 GPUs)
        "plan_devices": 0,
        # --dry_run also compiles each stage's step (abstract inputs) and prints XLA's memory
        # analysis (temporaries per device); needs the mesh's devices (emulated on CPU)
        "plan_compile": False,
    })


def recipe(name: str, model_name: str, flavor: str, stage_order: Sequence[str],
           stages: Mapping[str, ConfigDict]) -> ConfigDict:
    """Assemble a full recipe config (model from configs/models, trainer defaults)."""
    if list(stage_order) != list(stages):
        raise ValueError(f"recipe {name}: stage_order {list(stage_order)} != stages "
                         f"{list(stages)}")
    c = ConfigDict()
    c.recipe = name
    c.model_name = model_name
    c.model = load_model(model_name, flavor)
    c.data_root = "data"  # relative source paths resolve against this directory
    c.tokenizer = {"path": "", "kind": "sentencepiece"}  # TokenizerConfig (path required)
    c.text_only = False  # True: drop media parts (LLM-only runs of any recipe)
    # record tasks whose answer transcribes the audio or captions the image (marked for the
    # `audio_ctc` and `image_bow` losses)
    c.transcript_tasks = ()
    # saved unit tokenizer (omni_jax.speech.units) for records whose spoken answer is audio
    c.speech_units = {"dir": ""}
    audio = c.model.get("audio")
    mel = {} if audio is None else audio.encoder_config.get("whisper", audio.encoder_config)
    # data.features AudioConfig: log-mel bins and clip length of the audio tower
    c.audio_features = {"n_mels": mel.get("num_mel_bins", 80),
                        "chunk_seconds": (audio.num_frames if audio else 3000) // 100}
    # where stage 1's parts start (omni_jax/recipes/init.py): HF directories or omni_jax
    # checkpoints (model: a seed's whole released model, native); empty = random init
    c.init = {"llm": "", "image": "", "video": "", "audio": "", "speech": "", "model": ""}
    # held-out evaluation (omni_jax.eval): data = manifests / directories ("" = the
    # validation or test split next to data_root); after_each_stage: the train CLI evaluates
    # every stage it trains and writes <workdir>/eval/<stage>.json
    c.eval = {"data": "", "after_each_stage": False, "max_records": 0, "max_new_tokens": 16}
    c.train = trainer_defaults()
    # modules imported before the stages are checked: their @register_loss functions become
    # loss names a stage may use (a stage with a new loss = this + the stage's `losses`)
    c.loss_modules = ()
    c.stage_order = tuple(stage_order)  # a tuple, so --config.stage_order='(a, b)' works
    c.stages = ml_collections.ConfigDict(dict(stages))
    if model_name == "tiny":
        tiny_overrides(c.stages)
    return c
