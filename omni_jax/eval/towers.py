"""A recipe stage's towers alone, without the LLM, on held-out records: what a stage that
trains a tower by itself (the demo's image_tower / audio_tower) has learned.

  tower_image  the image tower names the digit: image QA records whose answer is a digit
               word, answered by the digit word most likely under the stage's `image_bow`
               classifier of the pooled image tokens -> accuracy (+ chance: the most
               frequent answer's share)
  tower_asr    the audio tower transcribes: its audio tokens decoded greedily by the stage's
               `audio_ctc` classifier -> WER
Records the encoder cannot read are reported under "skipped", the rest evaluated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omni_jax.eval.tasks import read_items, reference_text


def tower_run(config: Any, train_dir: str, stage: str, manifest: str,
               max_records: int | None, keep: Callable[[Any], bool],
               fn: Callable[[Any, dict, dict], Any], batch_size: int = 32
               ) -> tuple[list[Any], list[Any], Any, list[dict]]:
    """A stage's towers alone on a manifest: the first max_records records `keep` selects,
    encoded (an unreadable one is reported, the rest evaluated), padded to batch_size rows
    with the model's media shapes, `fn(model_outputs, batch, {loss: its options})` jitted per
    batch -> (items, per-item outputs, encoder, skipped)."""
    import jax
    import jax.numpy as jnp

    from omni_jax.data import packing
    from omni_jax.recipes import final_params, make_encoder, make_plan, model_of
    from omni_jax.train.losses import loss_spec

    model = model_of(config)
    plan = next(p for p in make_plan(config, model, count_data=False) if p.name == stage)
    params = final_params(train_dir, plan, model)
    encoder = make_encoder(config, model.config)
    items, skipped = read_items([manifest])
    items = [it for it in items if keep(it)][:max_records]
    media = {}
    if model.config.audio is not None:
        media["audio"] = (int(config.audio_features.n_mels), int(model.config.audio.num_frames))
    if model.config.image is not None:
        side = int(model.config.image.image_size[0])
        media["image"] = (side, side, 3)
    opts = {name: loss_spec(name, spec)[1]  # options without the weight
            for name, spec in config.stages[stage].losses.to_dict().items()}
    step = jax.jit(lambda p, b: fn(model.apply(p, b), b, opts))
    good = []
    for it in items:
        try:
            good.append((it, packing.shift_example(encoder(it.record))))
        except (ValueError, OSError) as e:
            skipped.append(it.skip(f"unreadable: {e}"))
    kept, outs = [], []
    for i in range(0, len(good), batch_size):
        chunk = good[i:i + batch_size]
        exs = [ex for _, ex in chunk]
        used = {k: (batch_size, shape) for k, shape in media.items() if any(k in e for e in exs)}
        batch = packing.pad_batch(exs, batch_size, [max(packing.example_length(e)
                                                        for e in exs)], media=used)
        out = jax.device_get(step(params, {k: jnp.asarray(v) for k, v in batch.items()}))
        outs += [jax.tree.map(lambda x, r=r: x[r], out) for r in range(len(chunk))]
        kept += [it for it, _ in chunk]
    return kept, outs, encoder, skipped


def tower_asr(config: Any, train_dir: str, stage: str, manifest: str,
              max_records: int | None, batch_size: int = 32) -> dict[str, Any]:
    """The audio tower alone on held-out ASR clips: its audio tokens decoded greedily by the
    stage's `audio_ctc` classifier (no LLM) -> {"value": WER, ...} (eval.metrics WER)."""
    from omni_jax.eval.metrics import word_error_rate
    from omni_jax.train import audio_ctc as actc

    def fn(out, batch, opts):
        o = opts["audio_ctc"]
        frames, mask = actc.audio_frames(out["inputs_embeds"], batch["modality"],
                                         o["max_frames"])
        return actc.audio_ctc_log_probs(frames, out["lm_head"], o.get("scale", actc.SCALE),
                                        o.get("blank_cos", actc.BLANK_COS)), mask

    items, outs, encoder, skipped = tower_run(config, train_dir, stage, manifest, max_records,
                                               lambda it: True, fn, batch_size)
    hyps = [encoder.template.tokenizer.decode(actc.greedy_decode(lp[None], m[None])[0])
            for lp, m in outs]
    refs = [reference_text(it.record) for it in items]
    wer = word_error_rate(refs, hyps)
    return {"value": wer["wer"], **wer, "skipped": skipped,
            "answers": [{"reference": r, "prediction": h} for r, h in zip(refs, hyps)]}


def tower_image(config: Any, train_dir: str, stage: str, manifest: str,
                max_records: int | None, batch_size: int = 32) -> dict[str, Any]:
    """The image tower alone names the digit: the image QA records whose answer is a digit
    word, each answered by the digit word (mean log-prob of its tokens) most likely under the
    stage's `image_bow` classifier of the pooled image tokens (no LLM) -> {"value": accuracy,
    "chance": the most frequent answer's share, ...}."""
    import numpy as np

    from omni_jax.data.fixtures import DIGIT_WORDS
    from omni_jax.train import image_bow as ibow

    def fn(out, batch, opts):
        pooled, _ = ibow.pooled_image(out["inputs_embeds"], batch["modality"])
        return ibow.image_bow_log_probs(pooled, out["lm_head"],
                                        opts["image_bow"].get("scale", ibow.SCALE))

    words = list(DIGIT_WORDS)
    items, outs, encoder, skipped = tower_run(
        config, train_dir, stage, manifest, max_records,
        lambda it: reference_text(it.record).strip().lower() in words, fn, batch_size)
    ids = [encoder.template.tokenizer.encode(" " + w) for w in words]  # as inside a caption
    preds = [words[int(np.argmax([np.mean(lp[t]) for t in ids]))] for lp in outs]
    refs = [reference_text(it.record).strip().lower() for it in items]
    correct = sum(p == r for p, r in zip(preds, refs))
    chance = max(refs.count(w) for w in words) / len(refs) if refs else None
    acc = correct / len(refs) if refs else None
    return {"value": acc, "accuracy": acc,
            "correct": correct, "count": len(refs), "chance": chance, "skipped": skipped,
            "answers": [{"reference": r, "prediction": p} for r, p in zip(refs, preds)]}


TOWER_METRICS: dict[str, Callable[..., dict[str, Any]]] = {
    "tower_image_accuracy": tower_image, "tower_asr_wer": tower_asr}
