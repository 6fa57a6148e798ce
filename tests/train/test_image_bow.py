"""image_bow: caption-word classification of an image's pooled tokens vs torch (value,
gradients), the encoder's caption marks, the plan-time checks, gradients reaching the image
tower end to end, and a tower that learns to name held-out digits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from omni_jax.data import packing
from omni_jax.data.omni import OmniEncoder
from omni_jax.omni_config import OmniConfig
from omni_jax.train.image_bow import check_stage, image_bow_loss
from omni_jax.train.losses import LOSSES, make_objective
from tests.data.test_omni_data import AUDIO, CONFIG, setup  # noqa: F401 (fixture)
from tests.train.test_audio_ctc import (  # noqa: F401 (fixture)
    asr,
    check_value_and_grads,
    grad_norms,
)

B, S, D, V = 4, 20, 8, 13
SCALE = 6.0


def _batch(rng):
    """Rows: image at 2..6 + 3 caption tokens (one repeated); two images split by text + 2
    tokens; an image without caption (ignored); a caption without image (ignored)."""
    modality = np.zeros((B, S), np.int32)
    words = np.zeros((B, S), np.int32)
    ids = rng.integers(0, V, size=(B, S)).astype(np.int32)
    modality[0, 2:7] = 1
    words[0, 9:12] = 1
    ids[0, 11] = ids[0, 9]  # a word said twice counts twice
    modality[1, 0:3] = 1
    modality[1, 5:9] = 1
    words[1, 12:14] = 1
    modality[2, 1:6] = 1
    modality[3, 1:6] = 3  # audio, not an image
    words[3, 8:11] = 1
    return {"input_ids": ids, "modality": modality, "transcript_mask": words}


def _torch_reference(embeds, kernel, batch):
    """Per row with image tokens and caption tokens: the mean image token, SCALE * its cosine
    to each kernel column, log-softmax, minus the mean log-prob of the caption tokens (float64);
    averaged over those rows."""
    e = torch.tensor(embeds, dtype=torch.float64, requires_grad=True)
    k = torch.tensor(kernel, dtype=torch.float64, requires_grad=True)
    losses = []
    for r in range(B):
        img = np.nonzero(batch["modality"][r] == 1)[0]
        lab = batch["input_ids"][r][batch["transcript_mask"][r] > 0]
        if len(img) == 0 or len(lab) == 0:
            continue
        x = e[r, torch.tensor(img)].mean(0)
        cos = (x / x.norm()) @ (k / k.norm(dim=0, keepdim=True))
        lp = torch.log_softmax(SCALE * cos, -1)
        losses.append(-lp[torch.tensor(lab, dtype=torch.long)].mean())
    loss = torch.stack(losses).mean()
    loss.backward()
    return loss.item(), e.grad.numpy(), k.grad.numpy()


def test_image_bow_value_and_grads_match_torch():
    rng = np.random.default_rng(0)
    batch = _batch(rng)
    embeds = rng.normal(size=(B, S, D)).astype(np.float32)
    kernel = rng.normal(size=(D, V)).astype(np.float32)
    ref, ref_e, ref_k = _torch_reference(embeds, kernel, batch)

    def f(e, k, head_grad=True):
        return image_bow_loss({"inputs_embeds": e, "lm_head": k}, batch, scale=SCALE,
                              head_grad=head_grad)

    metrics, g_e = check_value_and_grads(f, embeds, kernel, (ref, ref_e, ref_k), 1e-5, 1e-7)
    assert float(metrics["rows"]) == 2 and float(metrics["tokens"]) == 5
    # text tokens get no gradient; the pooled token's norm does not change the loss
    assert not np.any(g_e[batch["modality"] != 1])
    loss3, _ = f(jnp.asarray(embeds) * 7.0, jnp.asarray(kernel))
    np.testing.assert_allclose(float(loss3), ref, rtol=1e-6)
    # no captioned image in the batch: zero loss, zero rows, finite
    empty = {**batch, "transcript_mask": np.zeros_like(batch["transcript_mask"])}
    loss4, m4 = image_bow_loss({"inputs_embeds": embeds, "lm_head": kernel}, empty)
    assert float(loss4) == 0.0 and float(m4["rows"]) == 0


def test_image_bow_options_and_missing_inputs():
    assert "image_bow" in LOSSES
    for bad in ({"scale": float("inf")}, {"scale": 0.0}, {"scale": True}):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            make_objective({"image_bow": {"weight": 1.0, **bad}})
    with pytest.raises(ValueError, match="head_grad must be a bool"):
        make_objective({"image_bow": {"weight": 1.0, "head_grad": "False"}})
    batch = _batch(np.random.default_rng(1))
    with pytest.raises(ValueError, match="inputs_embeds"):
        image_bow_loss({"logits": None}, batch)
    with pytest.raises(ValueError, match="transcript_mask"):
        image_bow_loss({"inputs_embeds": 0, "lm_head": 0},
                       {k: v for k, v in batch.items() if k != "transcript_mask"})


def test_check_stage_errors():
    losses = {"image_bow": 1.0}
    tasks = ("image_caption",)
    check_stage("s", losses, {"packing": False}, tasks, True)
    check_stage("s", {"ce": 1.0}, {"packing": True}, (), False)  # no image_bow: no checks
    with pytest.raises(ValueError, match="image tower"):
        check_stage("s", losses, {}, tasks, False)
    with pytest.raises(ValueError, match="text_only=True"):
        check_stage("s", losses, {}, tasks, True, text_only=True)
    with pytest.raises(ValueError, match="xvila_output=True"):
        check_stage("s", losses, {}, tasks, True, xvila=True)
    with pytest.raises(ValueError, match="the string"):
        check_stage("s", losses, {}, "image_caption", True)
    with pytest.raises(ValueError, match="loss 'image_bow' needs the recipe's transcript"):
        check_stage("s", losses, {}, (), True)
    with pytest.raises(ValueError, match="packing=False"):
        check_stage("s", losses, {"packing": True}, tasks, True)


def test_encoder_marks_captions_and_gradient_reaches_the_image_tower_only(asr):  # noqa: F811
    cfg, template, records = asr
    enc = OmniEncoder(cfg, template, audio=AUDIO, transcript_tasks=("image_caption",))
    rec = records["image_caption"][0]
    ex = enc(rec)
    mask = ex["transcript_mask"]
    answer = rec["messages"][-1]["content"]
    answer = answer if isinstance(answer, str) else answer[0]["text"]
    assert template.tokenizer.decode(ex["input_ids"][mask > 0].tolist()).strip() == answer
    assert enc(records["image_qa"][0])["transcript_mask"].sum() == 0  # not a transcript task
    no_audio = OmniConfig.from_dict({k: v for k, v in CONFIG.items() if k != "audio"})
    assert enc(rec)["transcript_mask"].sum() == OmniEncoder(
        no_audio, template, transcript_tasks=("image_caption",))(rec)["transcript_mask"].sum()

    examples = [packing.shift_example(enc(r)) for r in records["image_caption"]]
    size = cfg.image.image_size[0]
    loss, metrics, norm = grad_norms(cfg, examples, {"image": (len(examples), (size, size, 3))},
                                     {"image_bow": 1.0})
    assert np.isfinite(float(loss)) and float(metrics["image_bow/rows"]) == len(examples)
    assert norm["image_encoder"] > 0 and norm["image_adapter"] > 0
    assert norm["llm"] == 0 and norm["audio_encoder"] == 0 and norm["audio_adapter"] == 0


def test_image_bow_traces_at_qwen7b_size():
    """Qwen2-7B's width and vocabulary, bf16 embeddings and head, 8 rows of 4096 tokens: the
    loss traces to an fp32 scalar and its only vocab-sized temporary is [rows, vocab]."""
    b, s, d, v = 8, 4096, 3584, 152064
    out = {"inputs_embeds": jax.ShapeDtypeStruct((b, s, d), jnp.bfloat16),
           "lm_head": jax.ShapeDtypeStruct((d, v), jnp.bfloat16)}
    batch = {k: jax.ShapeDtypeStruct((b, s), jnp.int32)
             for k in ("input_ids", "modality", "transcript_mask")}
    loss, metrics = jax.eval_shape(lambda o, x: image_bow_loss(o, x), out, batch)
    assert loss.shape == () and loss.dtype == jnp.float32
    assert set(metrics) == {"bow", "rows", "tokens"}
    lowered = jax.jit(lambda o, x: image_bow_loss(o, x)[0]).lower(out, batch)
    assert f"{b}x{v}xf32" in lowered.as_text() and f"{b}x{s}x{v}" not in lowered.as_text()
