"""Evaluation records and the per-task evaluators.

Records are JSONL manifests in the project's format (omni_jax.data.sources / the omni_digits
export): a ChatML conversation whose last turn is the assistant's reference answer, media refs
relative to the manifest. A record's task is its "task" field, else its manifest's file name
(image_qa.jsonl -> image_qa). Task -> metric(s):
  image_qa -> image_qa_accuracy            video_qa -> video_qa_accuracy
  spoken_image_qa -> spoken_image_qa_accuracy   video_spoken_qa -> video_spoken_qa_accuracy
  text_chat -> text_chat_accuracy          speech_asr -> asr_wer
  speech_response -> speech_roundtrip_wer (+ _ref)
  speech_dpo -> dpo_preference_accuracy, expressive_style_accuracy
Accuracy = exact match after normalisation (eval.metrics); WER is corpus WER. Other tasks (e.g.
image_caption) are reported as skipped. Speech round trip: the model answers, its generator +
the vocoder speak the answer, the audio goes back to the same model with an ASR prompt; WER of
the transcript against the model's text answer (speech_roundtrip_wer) and against the reference
answer (_ref). Expressive style of the speech_dpo prompts' generated speech: eval.style.
An evaluator gets `ev` (eval.runner.Evaluator: prompts, batched answers, speech, DPO
log-likelihoods) and raises nothing for bad records: they go to `skipped` with a reason.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from omni_jax.eval import metrics as M

MEDIA_FIELDS = {"image": "images", "video": "videos", "audio": "audios"}
QA_TASKS = ("image_qa", "video_qa", "spoken_image_qa", "video_spoken_qa", "text_chat")
TASK_METRICS = {**{t: (f"{t}_accuracy",) for t in QA_TASKS}, "speech_asr": ("asr_wer",),
                "speech_response": ("speech_roundtrip_wer", "speech_roundtrip_wer_ref"),
                "speech_dpo": ("dpo_preference_accuracy", "expressive_style_accuracy")}
ASR_PROMPT = "Transcribe the audio."  # the round trip's question (omni_digits' first ASR prompt)


class Skip(Exception):  # noqa: N818 - a control-flow signal, not an error
    """A record that cannot be evaluated; the message is the reason."""


@dataclasses.dataclass
class Item:
    """One manifest record: where it came from, its task and the parsed record (media refs
    resolved to absolute paths)."""

    source: str
    line: int
    id: str
    task: str
    record: dict[str, Any]

    def skip(self, reason: str) -> dict[str, Any]:
        return {"source": self.source, "line": self.line, "id": self.id, "task": self.task,
                "reason": reason}


@dataclasses.dataclass
class Prepared:
    """An item turned into a prompt: batch of one (prompt_from_record) + reference answer."""

    item: Item
    reference: str
    batch: dict[str, np.ndarray]


def manifest_paths(data: Sequence[str]) -> list[str]:
    """--data values (JSONL files or directories of them) -> manifest paths; ValueError for a
    missing path or a directory without *.jsonl."""
    if not data:
        raise ValueError("no evaluation data: give --data (a JSONL manifest or a directory of "
                         "them)")
    out: list[str] = []
    for p in data:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".jsonl"))
            if not found:
                raise ValueError(f"--data {p!r}: a directory without *.jsonl manifests")
            out += found
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise ValueError(f"--data {p!r}: no such file or directory (expected a JSONL "
                             f"manifest or a directory of them)")
    return out


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, list | tuple):
        return [x for v in value for x in _leaves(v)]
    return [value]


def _resolve(value: Any, base: str) -> Any:
    if isinstance(value, list | tuple):
        return [_resolve(v, base) for v in value]
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base, value))


def _text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, Mapping)
                 and p.get("type") == "text"]
        return " ".join(parts) if parts else None
    return None


def check_record(rec: Mapping[str, Any]) -> str | None:
    """Why a parsed record cannot be evaluated (None if it can): the conversation must end in a
    text assistant answer after a user turn, and each modality's placeholders must match its
    media items one to one."""
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or len(msgs) < 2 or not all(isinstance(m, Mapping)
                                                             for m in msgs):
        return "no conversation: expected 'messages' with a user turn and the assistant answer"
    if msgs[-1].get("role") != "assistant" or msgs[-2].get("role") != "user":
        return "the conversation must end with a user turn then the assistant's answer"
    if _text(msgs[-1].get("content")) is None:
        return "the assistant answer has no text"
    for m, key in MEDIA_FIELDS.items():
        parts = sum(1 for msg in msgs if isinstance(msg.get("content"), list)
                    for p in msg["content"] if isinstance(p, Mapping) and p.get("type") == m)
        value = rec.get(key, rec.get(m))
        items = 0 if value is None else len(value) if isinstance(value, list) else 1
        if parts != items:
            return (f"placeholder mismatch: {parts} {m} placeholder(s) in the messages but "
                    f"{items} {m} item(s) in '{key}'")
    return None


def read_items(paths: Sequence[str], max_records: int | None = None
               ) -> tuple[list[Item], list[dict[str, Any]]]:
    """Every record of the manifests -> (items to evaluate, skipped entries). max_records: at
    most that many items per task (the first ones)."""
    if max_records is not None and (not isinstance(max_records, int) or max_records <= 0):
        raise ValueError(f"max_records must be a positive int or None, got {max_records!r}")
    items, skipped, per_task = [], [], {}
    for path in paths:
        stem, base = os.path.splitext(os.path.basename(path))[0], os.path.dirname(
            os.path.abspath(path))
        with open(path, "rb") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = Item(path, line_no, f"{stem}:{line_no}", stem, {})
                try:
                    rec = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    skipped.append(where.skip(f"bad JSON: {e}"))
                    continue
                if not isinstance(rec, dict):
                    skipped.append(where.skip(f"expected a JSON object, got "
                                              f"{type(rec).__name__}"))
                    continue
                where.id, where.task = str(rec.get("id", where.id)), str(rec.get("task", stem))
                if where.task not in TASK_METRICS:
                    skipped.append(where.skip(f"unknown task {where.task!r}: no metric; tasks "
                                              f"with metrics: {list(TASK_METRICS)}"))
                    continue
                if max_records is not None and per_task.get(where.task, 0) >= max_records:
                    continue
                problem = check_record(rec)
                for m, key in MEDIA_FIELDS.items():
                    if problem is None and rec.get(key, rec.get(m)) is not None:
                        value = _resolve(rec.pop(key, None) or rec.pop(m), base)
                        rec[key] = value if isinstance(value, list) else [value]
                        missing = [r for r in _leaves(rec[key]) if not isinstance(r, str)
                                   or not os.path.isfile(r)]
                        if missing:
                            problem = f"{key}: missing media file {missing[0]!r}"
                if problem is not None:
                    skipped.append(where.skip(problem))
                    continue
                where.record = rec
                per_task[where.task] = per_task.get(where.task, 0) + 1
                items.append(where)
    return items, skipped


# ---- evaluators -------------------------------------------------------------------------------
def _prepare_all(ev: Any, items: Sequence[Item], skipped: list[dict[str, Any]]
                 ) -> list[Prepared]:
    out = []
    for it in items:
        try:
            out.append(ev.prepare(it))
        except Skip as e:
            skipped.append(it.skip(str(e)))
    return out


def _answers(prepared: Sequence[Prepared], predictions: Sequence[str],
             references: Sequence[str] | None = None) -> list[dict[str, str]]:
    """Every record's prediction and reference (the report keeps them all)."""
    refs = [p.reference for p in prepared] if references is None else references
    return [{"id": p.item.id, "prediction": a, "reference": r}
            for p, a, r in zip(prepared, predictions, refs)]


def reference_text(record: Mapping[str, Any]) -> str:
    """A record's reference answer: the last (assistant) turn's text ("" if it has none)."""
    return _text(record["messages"][-1]["content"]) or ""


def question_text(record: Mapping[str, Any]) -> str:
    """A QA record's question: `question_text` (spoken questions) or the last user turn's text."""
    if record.get("question_text"):
        return str(record["question_text"])
    user = [m for m in record.get("messages", ()) if m.get("role") == "user"]
    return (_text(user[-1]["content"]) if user else None) or ""


def _accuracy(task: str, prepared: Sequence[Prepared], answers: Sequence[str]) -> dict:
    """Exact-match accuracy, with the set's chance level (M.prior_baseline) and per question."""
    refs = [p.reference for p in prepared]
    questions = [question_text(p.item.record) for p in prepared]
    acc = M.accuracy(answers, refs)
    by_question: dict[str, list[int]] = {}
    for q, a, r in zip(questions, answers, refs):
        c = by_question.setdefault(q, [0, 0])
        c[0], c[1] = c[0] + int(M.exact_match(a, r)), c[1] + 1
    # chance: what the question alone buys, given media; a text-only question is the whole
    # input (a text problem's own answer), so a text-only set has none
    media = any(p.item.record.get(k) for p in prepared for k in MEDIA_FIELDS.values())
    return {"task": task, "value": acc["accuracy"], **acc,
            "chance": M.prior_baseline(questions, refs)["accuracy"] if media else None,
            "by_question": {q: {"accuracy": c / n, "count": n}
                            for q, (c, n) in sorted(by_question.items())},
            "answers": _answers(prepared, answers)}


def _wer(task: str, refs: Sequence[str], hyps: Sequence[str], prepared: Sequence[Prepared]
         ) -> dict:
    w = M.word_error_rate(refs, hyps)
    return {"task": task, "value": w["wer"], **w, "answers": _answers(prepared, hyps, refs)}


def eval_qa(ev: Any, task: str, items: Sequence[Item], skipped: list[dict[str, Any]]) -> dict:
    prepared = _prepare_all(ev, items, skipped)
    if not prepared:
        return {}
    return {f"{task}_accuracy": _accuracy(task, prepared, ev.answers(prepared))}


def eval_asr(ev: Any, task: str, items: Sequence[Item], skipped: list[dict[str, Any]]) -> dict:
    prepared = _prepare_all(ev, items, skipped)
    if not prepared:
        return {}
    hyps = ev.answers(prepared)
    return {"asr_wer": _wer(task, [p.reference for p in prepared], hyps, prepared)}


def _needs_speech(ev: Any, items: Sequence[Item], skipped: list[dict[str, Any]],
                  what: str, audio_in: bool = False) -> bool:
    reason = ev.speech_problem(audio_in=audio_in, vocoder=audio_in)
    if reason is not None:
        skipped.extend(it.skip(f"{what}: {reason}") for it in items)
    return reason is None


def _wav_bytes(wav: np.ndarray, rate: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.asarray(wav, np.float32), rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def eval_roundtrip(ev: Any, task: str, items: Sequence[Item], skipped: list[dict[str, Any]]
                   ) -> dict:
    if not _needs_speech(ev, items, skipped, "speech round trip", audio_in=True):
        return {}
    prepared = _prepare_all(ev, items, skipped)
    if not prepared:
        return {}
    answers = ev.answers(prepared)
    transcripts, asr, where, silent = [""] * len(prepared), [], [], 0
    spoken = ev.speak_many(prepared, answers)
    for k, (p, answer, (_, wav)) in enumerate(zip(prepared, answers, spoken)):
        heard = None
        if wav.size:  # empty or silent speech: a model failure, scored as an empty transcript
            record = {"id": p.item.id, "audios": [_wav_bytes(wav, ev.sample_rate)],
                      "messages": [{"role": "user", "content": [
                          {"type": "audio"}, {"type": "text", "text": ASR_PROMPT}]},
                          {"role": "assistant", "content": answer}]}
            try:
                heard = ev.prepare(Item(p.item.source, p.item.line, p.item.id, "speech_asr",
                                        record))
            except Skip:
                heard = None
        if heard is None:
            silent += 1
        else:
            asr.append(heard)
            where.append(k)
    for k, t in zip(where, ev.answers(asr) if asr else []):
        transcripts[k] = t
    own = _wer(task, answers, transcripts, prepared)
    ref = _wer(task, [p.reference for p in prepared], transcripts, prepared)
    own["silent"] = ref["silent"] = silent
    return {"speech_roundtrip_wer": own, "speech_roundtrip_wer_ref": ref}


def eval_dpo(ev: Any, task: str, items: Sequence[Item], skipped: list[dict[str, Any]]) -> dict:
    if not _needs_speech(ev, items, skipped, "DPO preference"):
        return {}
    ok, pairs = [], []
    for it in items:
        if not it.record.get("speech_units") or not it.record.get("speech_units_rejected"):
            skipped.append(it.skip("speech_dpo record without speech_units and "
                                   "speech_units_rejected"))
            continue
        try:
            pairs.append(ev.dpo_example(it))
            ok.append(it)
        except Skip as e:
            skipped.append(it.skip(str(e)))
    if not ok:
        return {}
    chosen, rejected = ev.dpo_logliks(pairs)
    wins = int(np.sum(np.asarray(chosen) > np.asarray(rejected)))
    out = {"dpo_preference_accuracy": {
        "task": task, "value": wins / len(ok), "correct": wins, "count": len(ok),
        "margin": float(np.mean(np.asarray(chosen) - np.asarray(rejected))),
        "pairs": [{"id": it.id, "chosen": float(c), "rejected": float(r)}
                  for it, c, r in zip(ok, chosen, rejected)]}}
    from omni_jax.eval import style as S  # (style reads this module's records)

    style = S.eval_style(ev, task, ok, skipped)
    if style:
        out["expressive_style_accuracy"] = style
    return out


EVALUATORS: dict[str, Callable[..., dict]] = {
    **dict.fromkeys(QA_TASKS, eval_qa), "speech_asr": eval_asr,
    "speech_response": eval_roundtrip, "speech_dpo": eval_dpo}
