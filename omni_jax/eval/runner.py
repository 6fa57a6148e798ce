"""Evaluate a trained stage on JSONL manifests: `evaluate_stage(config, workdir, stage, data)`.

The stage's final parameters (default: the last finished stage) answer every record's last user
turn with greedy decoding (batched: rows of one task padded to a power of two, prompts
left-padded to a multiple of 32 tokens, so few shapes compile); eval.tasks turns the answers
into metrics. Records that cannot be evaluated (unreadable media, a silent or empty wav,
placeholders that do not match the media, a modality the model lacks, an unknown task) are
listed under "skipped" with source, line, id and reason; the rest are evaluated.
Speech-out metrics (round trip, DPO preference, expressive style) need a speech generator that
a finished stage up to the evaluated one trained, and (except DPO) a vocoder: units_dir, else
config.speech_units.dir, else a `units/` directory next to the first manifest (the omni_digits
export and data.speech_fixtures write one there).
Default data (`default_data`): config.eval.data if set, else the first of <data_root>/validation,
<data_root>/test, <data_root>/../validation, <data_root>/../test holding *.jsonl.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from omni_jax.eval import tasks as T
from omni_jax.omni_config import MODALITIES, OmniConfig

SILENCE = 1e-4  # peak |sample| below which an audio clip counts as silent
SPEECH_PARAMS = ("speech", "speech_ref")
# new tokens beyond a reference's own length: greedy answers are never cut shorter than the
# answer they are scored against (max_new_tokens is the floor)
REFERENCE_SLACK = 4
PAD_TO = 32  # prompt widths are rounded up to a multiple of this (fewer compiled shapes)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _round_up(n: int, step: int = PAD_TO) -> int:
    return -(-int(n) // step) * step


def _left_pad(batch: Mapping[str, np.ndarray], width: int, pad_id: int) -> dict[str, Any]:
    """Left-pad input_ids / modality / segment_ids (/ media_index) of a prompt batch to
    `width` tokens."""
    out = dict(batch)
    n = batch["input_ids"].shape[1]
    seg = batch.get("segment_ids")
    seg = np.ones_like(batch["input_ids"], np.int32) if seg is None else seg
    pad = ((0, 0), (width - n, 0))
    out["input_ids"] = np.pad(batch["input_ids"], pad, constant_values=pad_id)
    out["modality"] = np.pad(batch["modality"], pad)
    out["segment_ids"] = np.pad(seg, pad).astype(np.int32)
    if batch.get("media_index") is not None:
        out["media_index"] = np.pad(batch["media_index"], pad, constant_values=-1)
    return out


class _Unvoiced:
    """The vocoder's rates and vocabulary for SpeechOut, no synthesis (empty audio)."""

    def __init__(self, vocoder: Any) -> None:
        self.sample_rate = vocoder.sample_rate
        self.vocab_size = getattr(vocoder, "vocab_size", None)

    def __call__(self, units: np.ndarray) -> np.ndarray:
        return np.zeros((0,), np.float32)


class Evaluator:
    """A stage's model, params, tokenizer and encoders: prompts, batched greedy answers, speech
    out and DPO log-likelihoods for the evaluators of eval.tasks."""

    def __init__(self, config: ml_collections.ConfigDict, params: Mapping[str, Any], *,
                 speech_trained: bool = False, vocoder: Any = None, max_new_tokens: int = 16,
                 batch_size: int = 8) -> None:
        from omni_jax.data.omni import OmniEncoder
        from omni_jax.recipes.data import audio_config
        from omni_jax.recipes.plan import load_template
        from omni_jax.train.omni_model import OmniLM

        for name, v in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.config = config
        self.omni = OmniConfig.from_dict(config.model.to_dict())
        self.lm = OmniLM(self.omni)
        self.template = load_template(config, self.omni)
        self.tok = self.template.tokenizer
        self.encoder = OmniEncoder(self.omni, self.template, audio=audio_config(config))
        self.params = dict(params)
        self.variables = {"params": {k: v for k, v in self.params.items()
                                     if k not in SPEECH_PARAMS}}
        self.speech_trained, self.vocoder = bool(speech_trained), vocoder
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.stops = (self.tok.eos_id, self.tok.endoftext_id)
        self._speech_out = self._dpo_encoder = self._loglik = None

    # ---- prompts --------------------------------------------------------------------------
    def _media(self, rec: Mapping[str, Any]) -> dict[str, np.ndarray]:
        from omni_jax.data.features import audio as afeat
        from omni_jax.data.sources import read_media

        for m in MODALITIES:
            if rec.get(T.MEDIA_FIELDS[m]):
                if self.config.get("text_only"):
                    raise T.Skip(f"a text_only recipe drops media; the record has {m} input")
                if getattr(self.omni, m) is None:
                    raise T.Skip(f"the model has no {m} tower (recipe "
                                 f"{self.config.get('recipe')!r})")
        for ref in rec.get("audios") or ():
            try:
                wave = afeat.decode_audio(read_media(ref), self.encoder.audio_cfg)
            except (ValueError, OSError) as e:
                raise T.Skip(f"audio item unreadable: {e}") from e
            peak = float(np.max(np.abs(wave)))
            if peak < SILENCE:
                raise T.Skip(f"silent audio: peak amplitude {peak:.2g} < {SILENCE:g}")
        try:
            return self.encoder.media(rec)
        except (ValueError, OSError) as e:  # CorruptMediaError is a ValueError
            raise T.Skip(str(e)) from e

    def prepare(self, item: T.Item) -> T.Prepared:
        """Item -> prompt of its last user turn (+ media) and reference; Skip with the reason."""
        from omni_jax.infer.omni import prompt_from_record

        rec = item.record
        media = self._media(rec)
        try:
            batch = prompt_from_record(self.encoder, {**rec, "messages": rec["messages"][:-1]},
                                       media=media)
        except ValueError as e:
            raise T.Skip(f"cannot build the prompt: {e}") from e
        reference = T.reference_text(rec)
        new = self.budget(reference)
        need = _round_up(batch["input_ids"].shape[1]) + new + 4
        if need > self.omni.llm.max_position_embeddings:
            raise T.Skip(f"prompt of {batch['input_ids'].shape[1]} tokens + {new} new exceeds "
                         f"max_position_embeddings {self.omni.llm.max_position_embeddings}")
        return T.Prepared(item, reference, batch)

    def budget(self, reference: str) -> int:
        """New tokens to generate for an answer to this reference: max_new_tokens, or the
        reference's length + REFERENCE_SLACK where longer (a worked answer is not cut)."""
        return max(self.max_new_tokens, len(self.tok.encode(reference)) + REFERENCE_SLACK)

    def _batches(self, items: Sequence[Any]) -> Any:
        """Chunks of batch_size, each padded (last row repeated) to a power-of-two rows."""
        for i in range(0, len(items), self.batch_size):
            chunk = list(items[i:i + self.batch_size])
            yield chunk, chunk + [chunk[-1]] * (min(self.batch_size, _pow2(len(chunk)))
                                                - len(chunk))

    def answers(self, prepared: Sequence[T.Prepared]) -> list[str]:
        """Greedy answers (stop ids cut, decoded, stripped), one per prompt, in order."""
        from omni_jax.infer.omni import collate_prompts, generate_omni

        out: list[str] = []
        for chunk, rows in self._batches(prepared):
            batch = collate_prompts([p.batch for p in rows], self.tok.pad_id, self.encoder.counts)
            batch = _left_pad(batch, _round_up(batch["input_ids"].shape[1]), self.tok.pad_id)
            new = max(self.budget(p.reference) for p in chunk)
            ids = np.asarray(generate_omni(
                self.lm.module, self.variables, batch, max_new_tokens=new,
                eos_id=self.stops, pad_id=self.tok.pad_id, vocab_limit=self.tok.vocab_size))
            for row in ids[:len(chunk)]:
                end = np.isin(row, self.stops)
                row = row[:np.argmax(end)] if end.any() else row
                out.append(self.tok.decode(row.tolist()).strip())
        return out

    # ---- speech out -----------------------------------------------------------------------
    def speech_problem(self, *, audio_in: bool = False, vocoder: bool = False) -> str | None:
        """Why speech-out metrics cannot run (None if they can)."""
        if self.omni.speech is None or "speech" not in self.params:
            return "the model has no speech generator (config.model.speech)"
        if not self.speech_trained:
            return "no finished stage up to this one trained the speech generator"
        if vocoder and self.vocoder is None:
            return ("no vocoder to voice the units: give --units_dir (or config.speech_units."
                    "dir, or a units/ directory next to the manifests)")
        if audio_in and self.omni.audio is None:
            return "the model has no audio tower to hear its own speech"
        return None

    @property
    def sample_rate(self) -> int:
        return int(self.vocoder.sample_rate)

    def vocode_many(self, units: Sequence[Any]) -> list[np.ndarray]:
        """Unit sequences -> wavs (empty units: empty audio), on every core (vocode_pool)."""
        from omni_jax.speech.vocode_pool import vocode_many

        return vocode_many(self.vocoder, units)

    def speak_many(self, prepared: Sequence[T.Prepared], answers: Sequence[str]
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per answer: the generator's units (its tokens fed after the prompt, framed as in
        training; none for an empty answer) and their wav, voiced together (vocode_many)."""
        units = [self._units(p, a) for p, a in zip(prepared, answers, strict=True)]
        return list(zip(units, self.vocode_many(units)))

    def _units(self, prepared: T.Prepared, answer: str) -> np.ndarray:
        from omni_jax.infer.speech import SpeechOut, speak_sentences

        ids = self.tok.encode(answer) if answer.strip() else []
        if not ids:
            return np.zeros((0,), np.int32)
        if self._speech_out is None:  # units only: speak_many voices them afterwards
            self._speech_out = SpeechOut.from_template(self.omni.speech, self.params["speech"],
                                                       _Unvoiced(self.vocoder), self.template)
        batch = _left_pad(prepared.batch, _round_up(prepared.batch["input_ids"].shape[1]),
                          self.tok.pad_id)
        (chunk,) = speak_sentences(self.lm.module, self.variables, batch, self._speech_out,
                                   [ids])
        return np.asarray(chunk.units, np.int32)

    # ---- DPO ------------------------------------------------------------------------------
    def dpo_example(self, item: T.Item) -> dict[str, np.ndarray]:
        """The record teacher-forced (shifted, as the trainer sees it) with both unit sides."""
        from omni_jax.data.omni import OmniEncoder
        from omni_jax.data.packing import shift_example
        from omni_jax.data.speech import SpeechTargets
        from omni_jax.recipes.data import audio_config

        if self._dpo_encoder is None:
            self._dpo_encoder = OmniEncoder(
                self.omni, self.template, audio=audio_config(self.config),
                speech=SpeechTargets(self.template, unit_vocab=self.omni.speech.unit_vocab))
        self._media(item.record)  # tower / silence checks with their reasons
        try:
            return shift_example(self._dpo_encoder(item.record))
        except ValueError as e:
            raise T.Skip(f"cannot encode the DPO pair: {e}") from e

    def _loglik_fn(self) -> Any:
        from omni_jax.train.omni_model import MODEL_KEYS
        from omni_jax.train.speech_model import SpeechHead, speech_loglik

        head, cfg, module = SpeechHead(self.omni.speech), self.omni.speech, self.lm.module

        def fn(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
            lm = {k: v for k, v in params.items() if k not in SPEECH_PARAMS}
            inputs = {k: batch[k] for k in MODEL_KEYS if k in batch}
            hidden = module.apply({"params": lm}, inputs, compute_logits=False)["hidden"]
            hidden = hidden.astype(jnp.float32)
            out = []
            for sfx in ("", "_rejected"):
                o = head.generate(params["speech"], hidden, batch, rejected=bool(sfx))
                out.append(speech_loglik(cfg, o, batch["speech_units" + sfx],
                                         batch["speech_unit_mask" + sfx]))
            return out[0], out[1]

        return jax.jit(fn)

    def dpo_logliks(self, examples: Sequence[dict[str, np.ndarray]]
                    ) -> tuple[list[float], list[float]]:
        """Length-normalised log-likelihoods l(chosen), l(rejected) of the policy generator."""
        from omni_jax.data.packing import place_media_index
        from omni_jax.data.speech import collate_speech

        if self._loglik is None:
            self._loglik = self._loglik_fn()
        chosen: list[float] = []
        rejected: list[float] = []
        for chunk, rows in self._batches(examples):
            w = _round_up(max(len(e["input_ids"]) for e in rows))
            b = len(rows)
            batch: dict[str, Any] = {"segment_ids": np.zeros((b, w), np.int32)}
            for key, fill in (("input_ids", self.tok.pad_id), ("modality", 0),
                              ("speech_rows", 0)):
                batch[key] = np.full((b, w), fill, np.int32)
            for r, e in enumerate(rows):
                n = len(e["input_ids"])
                for key in ("input_ids", "modality", "speech_rows"):
                    batch[key][r, :n] = e[key]
                batch["segment_ids"][r, :n] = 1
            batch["media_index"] = place_media_index(  # rows as the trainer's
                (b, w), [(r, 0, e) for r, e in enumerate(rows)], {}, self.encoder.counts)
            batch["positions"] = np.broadcast_to(np.arange(w, dtype=np.int32), (b, w)).copy()
            for m in (*MODALITIES, "audio_wave", "image_lowres"):
                if any(m in e for e in rows):
                    batch[m] = np.concatenate([e[m] for e in rows if m in e])
            spec = {"text_len": _pow2(max(len(e["speech_text_ids"]) for e in rows)),
                    "units_len": _pow2(max(max(len(e["speech_units"]),
                                               len(e["speech_units_rejected"])) for e in rows))}
            batch.update(collate_speech(rows, b, spec))
            c, r_ = self._loglik(self.params, {k: jnp.asarray(v) for k, v in batch.items()})
            chosen += np.asarray(c)[:len(chunk)].tolist()
            rejected += np.asarray(r_)[:len(chunk)].tolist()
        return chosen, rejected


# ---- stages, data, reports ----------------------------------------------------------------
def finished_stages(config: ml_collections.ConfigDict, workdir: str, model: Any = None
                    ) -> list[tuple[Any, bool]]:
    """[(plan, whether a finished stage up to it trained the speech generator)] in order."""
    from omni_jax.recipes import make_plan, stage_finished

    plans = make_plan(config, model, count_data=False)
    out, speech = [], False
    for p in plans:
        if stage_finished(workdir, p):
            speech = speech or "speech" in p.trainable_groups
            out.append((p, speech))
    return out


def resolve_stages(config: ml_collections.ConfigDict, workdir: str, stage: str | None,
                   model: Any = None) -> list[tuple[Any, bool]]:
    """stage None: the last finished stage; "all": every finished one; else that stage (it
    must have finished). ValueError naming the stages otherwise."""
    from omni_jax.recipes import stage_order

    names = stage_order(config)
    if stage not in (None, "all") and stage not in names:
        raise ValueError(f"unknown stage {stage!r}; recipe {config.recipe!r} has stages {names}"
                         f" (or 'all')")
    done = finished_stages(config, workdir, model)
    if not done:
        raise ValueError(f"no finished stage in {workdir}: none of {names} has its final "
                         f"checkpoint; train first (python -m omni_jax.cli.train) or check "
                         f"--workdir")
    if stage is None:
        return done[-1:]
    if stage == "all":
        return done
    picked = [d for d in done if d[0].name == stage]
    if not picked:
        raise ValueError(f"stage {stage!r} has not finished in {workdir}; finished: "
                         f"{[p.name for p, _ in done]}")
    return picked


def default_data(config: ml_collections.ConfigDict) -> list[str]:
    """config.eval.data if set, else the validation / test split next to data_root (module
    doc); ValueError when there is none."""
    ev = config.get("eval")
    given = ev.get("data") if hasattr(ev, "get") else None
    if given:
        return [given] if isinstance(given, str) else list(given)
    root = os.path.abspath(str(config.get("data_root") or "."))
    cands = [os.path.join(base, s) for base in (root, os.path.dirname(root))
             for s in ("validation", "test")]
    for d in cands:
        if os.path.isdir(d) and any(f.endswith(".jsonl") for f in os.listdir(d)):
            return [d]
    raise ValueError(f"no evaluation data: config.eval.data is unset and none of {cands} holds "
                     f"*.jsonl manifests; give --data")


def find_vocoder(config: ml_collections.ConfigDict, manifests: Sequence[str],
                 units_dir: str | None = None) -> Any:
    """MelTableVocoder of units_dir / config.speech_units.dir / <manifest dir>/units, or None
    when none of them exists (an explicit units_dir that is missing is a ValueError)."""
    from omni_jax.speech.vocoder import MelTableVocoder

    if units_dir is not None and not os.path.isfile(os.path.join(units_dir, "vocoder.json")):
        raise ValueError(f"--units_dir {units_dir!r}: no vocoder.json there (expected the "
                         f"directory MelTableVocoder.save writes)")
    cands = [units_dir, (config.get("speech_units") or {}).get("dir") or None,
             *(os.path.join(os.path.dirname(os.path.abspath(m)), "units") for m in manifests)]
    for d in cands:
        if d and os.path.isfile(os.path.join(d, "vocoder.json")):
            return MelTableVocoder.load(d)
    return None


def evaluate_items(ev: Evaluator, items: Sequence[T.Item],
                   skipped: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Run each task's evaluator -> {"metrics", "records", "skipped"}."""
    skipped = list(skipped)
    before = len(skipped)
    metrics: dict[str, Any] = {}
    by_task: dict[str, list[T.Item]] = {}
    for it in items:
        by_task.setdefault(it.task, []).append(it)
    for task, group in by_task.items():
        metrics.update(T.EVALUATORS[task](ev, task, group, skipped))
    dropped = len({(s["source"], s["line"]) for s in skipped[before:]})
    return {"metrics": metrics, "records": {"read": len(items) + before,
                                            "evaluated": len(items) - dropped,
                                            "skipped": before + dropped},
            "skipped": skipped}


def evaluate_stage(config: ml_collections.ConfigDict, workdir: str, stage: str | None,
                   data_paths: Sequence[str] | None, max_records: int | None = None, *,
                   max_new_tokens: int = 16, batch_size: int = 8,
                   units_dir: str | None = None) -> dict[str, Any]:
    """Evaluate one finished stage (None: the last) on manifests / directories of them (None:
    default_data) -> the report dict (metrics, records, skipped, settings)."""
    import flax.linen as nn

    from omni_jax.recipes import final_params, model_of

    t0 = time.time()
    if stage == "all":
        raise ValueError("evaluate_stage evaluates one stage; loop over resolve_stages(..., "
                         "'all') for every finished stage")
    manifests = T.manifest_paths(default_data(config) if data_paths is None else data_paths)
    items, skipped = T.read_items(manifests, max_records)
    model = model_of(config)
    ((plan, speech_trained),) = resolve_stages(config, workdir, stage, model)
    vocoder = find_vocoder(config, manifests, units_dir) if model.config.speech else None
    params = nn.unbox(final_params(workdir, plan, model))
    ev = Evaluator(config, params, speech_trained=speech_trained, vocoder=vocoder,
                   max_new_tokens=max_new_tokens, batch_size=batch_size)
    report = evaluate_items(ev, items, skipped)
    return {"stage": plan.name, "recipe": config.get("recipe"), "workdir": workdir,
            "data": manifests, "speech_generator_trained": speech_trained,
            "vocoder": vocoder is not None, "max_new_tokens": max_new_tokens,
            "max_records": max_records, **report, "seconds": round(time.time() - t0, 1)}


def format_report(report: Mapping[str, Any]) -> str:
    """The report as a table: stage, metric, value, count, chance (QA: the media-blind
    answerer's accuracy, metrics.prior_baseline) (+ a skipped-records line)."""
    lines = [f"{'stage':<16} {'metric':<28} {'value':>8} {'count':>6} {'chance':>8}"]
    for name, m in report["metrics"].items():
        v, ch = m.get("value"), m.get("chance")
        lines.append(f"{report['stage']:<16} {name:<28} "
                     f"{'n/a' if v is None else format(v, '.4f'):>8} {m.get('count', 0):>6} "
                     f"{'' if ch is None else format(ch, '.4f'):>8}")
    r = report["records"]
    lines.append(f"{report['stage']}: {r['evaluated']} record(s) evaluated, {r['skipped']} "
                 f"skipped" + (" (see 'skipped' in the JSON)" if r["skipped"] else ""))
    return "\n".join(lines)
