"""X-VILA's output stages from manifests, end to end: omni_digits' image-out records (text ->
image, image -> image, video -> next frame) -> the train CLI's recipe runner -> a run directory
the chat CLI draws from. The head's input statistics are calibrated once, on decoder_align's
own data, and stay frozen; decoder_align keeps the LLM bit-identical."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from omni_jax.decoders.xvila import HEAD, IN_SCALE, IN_SHIFT
from omni_jax.recipes import final_params, load_recipe, make_plan, model_of, run
from omni_jax.recipes.plan import example_batch
from omni_jax.train.trainer import Trainer

STAGES = ("decoder_align", "x2x_textual", "x2x_visual")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from omni_jax.data.omni_digits import prepare, write_manifests
    from omni_jax.data.tokenizer import DEFAULT_SPECIAL_TOKENS, train_sentencepiece

    root = tmp_path_factory.mktemp("xvila")
    builder = prepare("small", str(root / "tfds"))
    paths = write_manifests(builder, str(root / "train"), "train")
    texts = []
    for name in ("text_to_image", "image_to_image", "video_next_frame", "image_qa"):
        with open(paths[name]) as f:
            for m in (m for line in f for m in json.loads(line)["messages"]):
                c = m["content"]
                texts.append(c if isinstance(c, str) else " ".join(
                    p.get("text", "") for p in c))
    spm = train_sentencepiece(texts * 10, 320, str(root / "spm"),
                              special_tokens=(*DEFAULT_SPECIAL_TOKENS, "<gen_image>"))
    c = load_recipe("xvila:model=tiny,output=on")
    c.data_root, c.tokenizer.path, c.stage_order = str(root / "train"), str(spm), STAGES
    for s in STAGES:
        c.stages[s].steps, c.stages[s].optim.lr = 3, 3e-3
    c.stages.decoder_align.optim.warmup_steps = 1  # lr > 0 at step 0
    c.train.peak_flops, c.train.progress_bar, c.train.tensorboard = 1e9, False, False
    lines: list[str] = []
    workdir = str(root / "run")
    status = run(c, workdir, echo=lines.append)
    return c, workdir, status, "\n".join(lines)


def test_output_stages_train_from_image_out_manifests(trained):
    c, workdir, status, log = trained
    assert status == dict.fromkeys(STAGES, "trained"), log
    assert "WARNING" not in log, log  # no record dropped or skipped
    model = model_of(c)
    plans = {p.name: p for p in make_plan(c, model)}
    fresh = Trainer(plans["decoder_align"].trainer_config, plans["decoder_align"].model)
    init = jax.device_get(fresh.init_state(example_batch(plans["decoder_align"]))["params"])
    align = jax.device_get(final_params(workdir, plans["decoder_align"], model))
    for a, b in zip(jax.tree.leaves(init["llm"]), jax.tree.leaves(align["llm"]), strict=True):
        assert np.array_equal(a, b)  # the LLM is frozen through decoder alignment
    head = align[HEAD]
    assert not model.needs_calibration(align)  # calibrated on the stage's own batches
    assert np.abs(head[IN_SHIFT]).max() > 0 and np.all(head[IN_SCALE] > 0)
    assert not np.allclose(head[IN_SCALE], 1)
    for later in ("x2x_textual", "x2x_visual"):  # frozen from then on
        p = jax.device_get(final_params(workdir, plans[later], model))[HEAD]
        np.testing.assert_array_equal(p[IN_SHIFT], head[IN_SHIFT])
        np.testing.assert_array_equal(p[IN_SCALE], head[IN_SCALE])
    assert "stage decoder_align: loss" in log and "stage x2x_visual: loss" in log


def test_chat_draws_from_the_run_directory(trained, tmp_path):
    from omni_jax.cli.chat import run_chat
    from omni_jax.recipes.run import load_run_config

    c, workdir, _, _ = trained
    saved = load_run_config(workdir)
    out = str(tmp_path / "seven.png")
    lines: list[str] = []
    run_chat(saved, workdir, "Draw a seven.", out=out, image_steps=3, guidance=2.0,
             echo=lines.append)
    img = np.asarray(Image.open(out))
    assert img.shape == (8, 8) and img.dtype == np.uint8 and "wrote" in lines[-1]
    src = os.path.join(c.data_root, "images", sorted(os.listdir(
        os.path.join(c.data_root, "images")))[0])
    out2 = str(tmp_path / "copy.png")
    run_chat(saved, workdir, "Reproduce this image.", images=[src], out=out2, image_steps=3,
         guidance=0.0, echo=lines.append)
    assert np.asarray(Image.open(out2)).shape == (8, 8)
    frames = tmp_path / "frames"  # video -> next frame: a directory of frame images
    frames.mkdir()
    for k, name in enumerate(sorted(os.listdir(os.path.join(c.data_root, "images")))[:3]):
        shutil.copy(os.path.join(c.data_root, "images", name), frames / f"{k:03d}.png")
    out3 = str(tmp_path / "next.png")
    run_chat(saved, workdir, "Draw the next frame.", videos=[str(frames)], out=out3,
             image_steps=3, guidance=2.0, echo=lines.append)
    assert np.asarray(Image.open(out3)).shape == (8, 8)
    answer = run_chat(saved, workdir, "What digit is this?", images=[src], max_new_tokens=3,
                      echo=lines.append)  # the same run answers in text too
    assert isinstance(answer, str)


def test_chat_draws_where_the_model_asks_for_an_image(trained, tmp_path, monkeypatch):
    """When the model's own answer emits the K generation tokens, the image comes from those
    positions (its text before them echoed); an answer without them gets the K tokens
    appended to the prompt. The LLM's answer and the decoder are stubbed: this checks which
    sequence reaches XVilaLM.generate."""
    import jax.numpy as jnp

    import omni_jax.cli.chat as chat_mod
    from omni_jax.data.tokenizer import load_tokenizer
    from omni_jax.recipes.run import load_run_config
    from omni_jax.train.xvila_model import XVilaLM

    _, workdir, _, _ = trained
    saved = load_run_config(workdir)
    tok = load_tokenizer(saved.tokenizer.to_dict())
    gid, word = tok.gen_image_id, tok.encode("seven")
    seen: dict = {}

    def fake_generate(self, params, batch, rng, **kw):
        seen["ids"] = np.asarray(batch["input_ids"])[0].tolist()
        return jnp.zeros((1, 8, 8, 1))

    monkeypatch.setattr(XVilaLM, "generate", fake_generate)
    answers = {"asks": [*word, gid, gid, gid, gid, tok.eos_id, tok.pad_id],
               "plain": [*word, tok.eos_id, tok.pad_id]}
    for kind, answer in answers.items():
        monkeypatch.setattr(chat_mod, "generate_omni",
                            lambda *a, answer=answer, **k: np.array([answer]))
        lines: list[str] = []
        chat_mod.run_chat(saved, workdir, "Draw a seven.", out=str(tmp_path / f"{kind}.png"),
                          image_steps=2, echo=lines.append)
        if kind == "asks":
            assert seen["ids"][-(len(word) + 4):] == [*word, gid, gid, gid, gid]
            assert lines[0] == tok.decode(word).strip() and "wrote" in lines[-1]
        else:  # forced: the prompt, then the K tokens
            assert seen["ids"][-4:] == [gid] * 4 and seen["ids"][-5] != word[-1]
            assert len(lines) == 1
