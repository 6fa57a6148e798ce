"""audio_ctc: CTC of the LLM's audio input tokens vs torch (value, gradients), the encoder's
transcript marks, the plan-time checks, and gradients reaching the audio tower end to end."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from omni_jax.data import packing
from omni_jax.data.omni import OmniEncoder
from omni_jax.omni_config import OmniConfig
from omni_jax.train.audio_ctc import audio_ctc_loss, check_stage, greedy_decode
from omni_jax.train.losses import LOSSES, make_objective
from omni_jax.train.omni_model import OmniLM
from tests.data.test_omni_data import AUDIO, CONFIG, setup  # noqa: F401 (fixture)

B, S, D, V = 4, 24, 8, 11
SCALE, BLANK = 5.0, 0.25


def _batch(rng):
    """Rows: audio at 3..10 + 4-token transcript; audio at 0..5 (split by text) + 2 tokens;
    audio but no transcript (ignored); a transcript longer than max_labels (overflow)."""
    modality = np.zeros((B, S), np.int32)
    words = np.zeros((B, S), np.int32)
    modality[0, 3:11] = 3
    words[0, 14:18] = 1
    modality[1, 0:3] = 3
    modality[1, 5:8] = 3  # non-contiguous audio tokens keep their order
    words[1, 10:12] = 1
    modality[2, 2:9] = 3
    modality[3, 1:9] = 3
    words[3, 12:19] = 1  # 7 > max_labels
    ids = rng.integers(0, V, size=(B, S)).astype(np.int32)
    return {"input_ids": ids, "modality": modality, "transcript_mask": words}


def _torch_reference(embeds, kernel, batch, max_labels):
    """Per row: SCALE * cosine(audio tokens in order, kernel columns), the blank logit
    SCALE * BLANK appended, log-softmax,
    torch CTC (float64) summed over rows with 0 < labels <= max_labels, / their labels."""
    e = torch.tensor(embeds, dtype=torch.float64, requires_grad=True)
    k = torch.tensor(kernel, dtype=torch.float64, requires_grad=True)
    total, n = 0.0, 0
    for r in range(B):
        fr = np.nonzero(batch["modality"][r] == 3)[0]
        lab = batch["input_ids"][r][batch["transcript_mask"][r] > 0]
        if len(lab) == 0 or len(lab) > max_labels:
            continue
        x = e[r, torch.tensor(fr)]
        cos = (x / x.norm(dim=-1, keepdim=True)) @ (k / k.norm(dim=0, keepdim=True))
        logits = torch.cat([SCALE * cos, torch.full((len(fr), 1), SCALE * BLANK,
                                                     dtype=torch.float64)], -1)
        lp = torch.log_softmax(logits, -1)[:, None]  # [T, 1, V + 1]
        total = total + torch.nn.functional.ctc_loss(
            lp, torch.tensor(lab[None], dtype=torch.long), torch.tensor([len(fr)]),
            torch.tensor([len(lab)]), blank=V, reduction="sum")
        n += len(lab)
    loss = total / n
    loss.backward()
    return loss.item(), e.grad.numpy(), k.grad.numpy()


def check_value_and_grads(f, embeds, kernel, reference, rtol, atol):
    """f(embeds, kernel, head_grad) -> (loss, metrics): value and both gradients match the
    torch `reference` (loss, d embeds, d kernel); with head_grad=False (the default of these
    losses) the kernel (the LLM's token embeddings) is a fixed target. -> (metrics, d embeds)."""
    ref, ref_e, ref_k = reference
    e, k = jnp.asarray(embeds), jnp.asarray(kernel)
    (loss, metrics), (g_e, g_k) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(e, k)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_e), ref_e, rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(g_k), ref_k, rtol=rtol, atol=atol)
    g_e0, g_k0 = jax.grad(lambda a, b: f(a, b, head_grad=False)[0], argnums=(0, 1))(e, k)
    np.testing.assert_allclose(np.asarray(g_e0), ref_e, rtol=rtol, atol=atol)
    assert not np.any(np.asarray(g_k0))
    return metrics, np.asarray(g_e)


def test_audio_ctc_value_and_grads_match_torch():
    rng = np.random.default_rng(0)
    batch = _batch(rng)
    embeds = rng.normal(size=(B, S, D)).astype(np.float32)
    kernel = rng.normal(size=(D, V)).astype(np.float32)
    ref, ref_e, ref_k = _torch_reference(embeds, kernel, batch, max_labels=6)

    def f(e, k, head_grad=True):
        return audio_ctc_loss({"inputs_embeds": e, "lm_head": k}, batch, max_frames=12,
                              max_labels=6, head_grad=head_grad, scale=SCALE, blank_cos=BLANK)

    metrics, _ = check_value_and_grads(f, embeds, kernel, (ref, ref_e, ref_k), 1e-4, 1e-6)
    assert float(metrics["rows"]) == 2 and float(metrics["tokens"]) == 6
    assert float(metrics["overflow"]) == 1 and float(metrics["infeasible"]) == 0
    # too few frame slots for row 0 (8 audio tokens): row 0 is left out, not truncated
    loss2, m2 = audio_ctc_loss({"inputs_embeds": embeds, "lm_head": kernel}, batch,
                               max_frames=7, max_labels=6)
    # the norm of an audio token does not change the loss (cosine classifier)
    loss3, _ = f(jnp.asarray(embeds) * 7.0, jnp.asarray(kernel))
    np.testing.assert_allclose(float(loss3), ref, rtol=1e-6)
    assert float(m2["rows"]) == 1 and float(m2["overflow"]) == 2
    assert np.isfinite(float(loss2))


def test_audio_ctc_options_and_missing_inputs():
    assert "audio_ctc" in LOSSES
    with pytest.raises(ValueError, match="max_frames and max_labels"):
        make_objective({"audio_ctc": {"weight": 1.0, "max_frames": 8}})
    for bad in ({"blank_cos": 2.0}, {"scale": float("inf")}, {"scale": 0.0}):
        with pytest.raises(ValueError, match="blank_cos"):
            make_objective({"audio_ctc": {"weight": 1.0, "max_frames": 8, "max_labels": 4,
                                          **bad}})
    for bad in ({"max_frames": 8.5}, {"max_frames": True}, {"max_labels": "4"}):
        with pytest.raises(ValueError, match="positive ints"):
            make_objective({"audio_ctc": {"weight": 1.0, "max_frames": 8, "max_labels": 4,
                                          **bad}})
    with pytest.raises(ValueError, match="bools"):
        make_objective({"audio_ctc": {"weight": 1.0, "max_frames": 8, "max_labels": 4,
                                      "head_grad": "False"}})
    batch = _batch(np.random.default_rng(1))
    with pytest.raises(ValueError, match="inputs_embeds"):
        audio_ctc_loss({"logits": None}, batch, max_frames=8, max_labels=4)
    with pytest.raises(ValueError, match="transcript_mask"):
        audio_ctc_loss({"inputs_embeds": 0, "lm_head": 0},
                       {k: v for k, v in batch.items() if k != "transcript_mask"},
                       max_frames=8, max_labels=4)


def test_check_stage_errors():
    losses = {"ce": 1.0, "audio_ctc": {"weight": 0.5, "max_frames": 8, "max_labels": 4}}
    tasks = ("speech_asr",)
    check_stage("s", losses, {"packing": False}, tasks, 8)
    check_stage("s", {"ce": 1.0}, {"packing": True}, (), None)  # no audio_ctc: nothing to check
    with pytest.raises(ValueError, match="audio tower"):
        check_stage("s", losses, {}, tasks, None)
    with pytest.raises(ValueError, match="below the 9 audio tokens"):
        check_stage("s", losses, {}, tasks, 9)
    with pytest.raises(ValueError, match="text_only=True"):
        check_stage("s", losses, {}, tasks, 8, text_only=True)
    with pytest.raises(ValueError, match="xvila_output=True"):
        check_stage("s", losses, {}, tasks, 8, xvila=True)
    with pytest.raises(ValueError, match="the string"):
        check_stage("s", losses, {}, "speech_asr", 8)
    with pytest.raises(ValueError, match="transcript_tasks"):
        check_stage("s", losses, {}, (), 8)
    with pytest.raises(ValueError, match="packing=False"):
        check_stage("s", losses, {"packing": True}, tasks, 8)


@pytest.fixture(scope="module")
def asr(setup):  # noqa: F811 (the imported fixture)
    """test_omni_data's fixture records (media paths resolved), each tagged with its task."""
    cfg, enc, records, _ = setup
    tagged = {task: [{**r, "task": task} for r in recs] for task, recs in records.items()}
    return cfg, enc.template, tagged


def test_encoder_marks_the_transcript_of_transcript_tasks_only(asr):
    cfg, template, records = asr
    enc = OmniEncoder(cfg, template, audio=AUDIO, transcript_tasks=("speech_asr",))
    rec = records["speech_asr"][0]
    ex = enc(rec)
    mask = ex["transcript_mask"]
    assert mask.shape == ex["input_ids"].shape and mask.sum() > 0
    answer = rec["messages"][-1]["content"]
    answer = answer if isinstance(answer, str) else answer[0]["text"]
    assert template.tokenizer.decode(ex["input_ids"][mask > 0].tolist()).strip() == answer
    assert not np.any(mask & (ex["modality"] != 0)) and np.all(mask <= ex["loss_mask"])
    for task in ("image_qa", "text_chat"):
        assert enc(records[task][0])["transcript_mask"].sum() == 0
    assert "transcript_mask" not in OmniEncoder(cfg, template, audio=AUDIO)(rec)
    with pytest.raises(ValueError, match="sequence of task names"):
        OmniEncoder(cfg, template, audio=AUDIO, transcript_tasks="speech_asr")
    with pytest.raises(ValueError, match="audio tower"):
        OmniEncoder(OmniConfig.from_dict({"llm": CONFIG["llm"]}), template,
                    transcript_tasks=("speech_asr",))


def grad_norms(cfg, examples, media, losses):
    """One batch of `examples` (packed with `media`), the OmniLM's gradient of `losses` ->
    (loss, metrics, {top-level param group: sum |grad|})."""
    batch = packing.pad_batch(examples, len(examples), [128], media=media)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    model = OmniLM(cfg)
    params = nn.unbox(model.init(jax.random.key(0), batch)["params"])
    objective = make_objective(losses)

    def f(p):
        return objective(model.apply(p, batch), batch)

    (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
    return loss, metrics, {k: float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(v)))
                           for k, v in grads.items()}


def test_gradient_reaches_the_audio_tower_only(asr):
    cfg, template, records = asr
    enc = OmniEncoder(cfg, template, audio=AUDIO, transcript_tasks=("speech_asr",))
    examples = [packing.shift_example(enc(r)) for r in records["speech_asr"]]
    loss, metrics, norm = grad_norms(
        cfg, examples, {"audio": (len(examples), (80, cfg.audio.num_frames))},
        {"audio_ctc": {"weight": 1.0, "max_frames": 32, "max_labels": 16}})
    assert np.isfinite(float(loss)) and float(metrics["audio_ctc/rows"]) == len(examples)
    assert norm["audio_encoder"] > 0 and norm["audio_adapter"] > 0
    assert norm["llm"] == 0 and norm["image_encoder"] == 0 and norm["image_adapter"] == 0


def test_greedy_decode_merges_repeats_drops_blanks_and_padding():
    v = 4  # ids 0..3, blank = 4
    path = [[1, 1, 4, 1, 2, 2, 4, 3, 0], [4, 4, 2, 4, 4, 4, 4, 4, 4]]
    lp = np.full((2, 9, v + 1), -5.0, np.float32)
    for r, row in enumerate(path):
        lp[r, np.arange(9), row] = 0.0
    mask = np.ones((2, 9), bool)
    mask[0, 7:] = False  # the last two frames of row 0 are padding
    assert greedy_decode(lp, mask) == [[1, 1, 2], [2]]
