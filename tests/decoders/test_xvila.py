"""X-VILA output head: generation tokens in the template, the LLM frozen bit-for-bit through a
decoder-alignment stage run by the trainer, the highway reusing the LLM pass's encoder features
(one vision-encoder call in the jaxpr), the VEH rows in the conditioning, generation, bad input."""

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from omni_jax.configs.models import tiny
from omni_jax.configs.recipes import xvila as recipe
from omni_jax.data.template import ChatTemplate, TemplateConfig
from omni_jax.data.tokenizer import (
    DEFAULT_SPECIAL_TOKENS,
    TokenizerConfig,
    load_tokenizer,
    train_sentencepiece,
)
from omni_jax.decoders.xvila import HEAD, IN_SCALE, IN_SHIFT, XVilaHeadConfig, gather_gen_rows
from omni_jax.model import tokens_per_item
from omni_jax.omni_config import OmniConfig
from omni_jax.train.omni_model import OmniLM
from omni_jax.train.trainer import Trainer, default_config
from omni_jax.train.xvila_model import XVilaLM, generate_image, make_gen_batch

K, SEQ = 4, 48
DRAW = [{"role": "user", "content": "Draw a seven."},
        {"role": "assistant", "content": [{"type": "gen_image"}]}]
COPY = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Copy it."}]},
        {"role": "assistant", "content": [{"type": "gen_image"}]}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tokenizer with <gen_image>, template, tiny xvila OmniConfig, XVilaLM (VEH) + params."""
    prefix = tmp_path_factory.mktemp("tok") / "sp"
    path = train_sentencepiece(["Draw a seven.", "Copy it.", "one two three seven"] * 20, 300,
                               prefix, special_tokens=(*DEFAULT_SPECIAL_TOKENS, "<gen_image>"))
    tok = load_tokenizer(TokenizerConfig(path=str(path), gen_image_token="<gen_image>"))
    tpl = ChatTemplate(tok, TemplateConfig(default_system_prompt=None, gen_image_tokens=K))
    config = OmniConfig.from_dict(tiny.get_config("xvila").to_dict())
    recipe_head = recipe.output_head("tiny", tiny.get_config("xvila"))
    head = XVilaHeadConfig.from_dict(recipe_head)
    model = XVilaLM(config, head, tok.gen_image_id)
    n_img = tokens_per_item(config, "image")
    rng = np.random.default_rng(0)
    exs = [tpl.encode(DRAW), tpl.encode(COPY, {"image": [n_img]})] * 2
    batch = make_gen_batch(exs, SEQ, tok.pad_id,
                           targets=rng.uniform(-1, 1, (4, 8, 8, 1)), seeds=np.arange(4),
                           images=rng.uniform(-1, 1, (2, 32, 32, 3)),
                           veh_index=np.array([-1, 0, -1, 1]))
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch))["params"]
    return tok, tpl, config, model, batch, params


def test_template_renders_k_generation_tokens(setup):
    tok, tpl, *_ = setup
    ex = tpl.encode(DRAW)
    gen = ex.input_ids == tok.gen_image_id
    assert gen.sum() == K and np.all(np.diff(np.flatnonzero(gen)) == 1)
    assert np.all(ex.loss_mask[gen] == 1) and np.all(ex.modality[gen] == 0)  # LLM emits them
    assert ChatTemplate(tok, TemplateConfig(gen_image_tokens=2)).encode(DRAW).input_ids.tolist(
        ).count(tok.gen_image_id) == 2
    plain = load_tokenizer(TokenizerConfig(path=tok.config.path))  # default: no gen token
    assert "gen_image" not in plain.special_ids
    with pytest.raises(ValueError, match="needs a tokenizer with a generation token"):
        ChatTemplate(plain).encode(DRAW)
    with pytest.raises(ValueError, match="gen_image_tokens must be a positive int"):
        TemplateConfig(gen_image_tokens=0)


def test_decoder_alignment_keeps_the_llm_bit_identical(setup):
    """Three trainer steps of the recipe's decoder_align stage: LLM, towers and highway are
    bit-identical, the output projection and the decoder moved, the diffusion loss fell."""
    *_, model, batch, params = setup
    c = default_config()
    c.batch_size, c.steps, c.progress_bar, c.tensorboard = 4, 3, False, False
    stage = load_stage("decoder_align")
    c.stage = ml_collections.ConfigDict({"name": "decoder_align", **stage})
    c.optim.lr, c.optim.warmup_steps, c.optim.schedule = 3e-3, 0, "constant"
    trainer = Trainer(c, model)
    state = trainer.init_state(batch, params=params)
    before = jax.device_get(state["params"])
    same = {k: batch for k in range(3)}
    losses = []
    for step in range(3):
        state, m = trainer.train_step(state, trainer.shard(same[step]))
        losses.append(float(m["loss/diffusion"]))
    after = jax.device_get(state["params"])
    for k in ("llm", "image_encoder", "image_adapter", "highway"):
        for a, b in zip(jax.tree.leaves(before[k]), jax.tree.leaves(after[k]), strict=True):
            assert np.array_equal(a, b), k
    for k in (IN_SHIFT, IN_SCALE):  # calibrated statistics: frozen in every stage
        assert np.array_equal(before["xvila_head"][k], after["xvila_head"][k]), k
    for k in ("xvila_head", "image_decoder"):
        trained = {n: v for n, v in before[k].items() if n not in (IN_SHIFT, IN_SCALE)}
        moved = [not np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(trained), jax.tree.leaves({n: after[k][n] for n in trained}))]
        assert sum(moved) > len(moved) // 2, k
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses  # same batch + seeds


def load_stage(name: str) -> dict:
    s = recipe.output_stages()[name]
    return {"trainable": s.trainable, "lr_groups": s.lr_groups.to_dict(),
            "losses": s.losses.to_dict()}


def count_eqns(jaxpr, prim: str) -> int:
    """Equations of primitive `prim` in a closed jaxpr, sub-jaxprs (pjit, scan...) included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == prim
        for v in eqn.params.values():
            for sub in v if isinstance(v, list | tuple) else [v]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += count_eqns(inner, prim)
    return n


def test_highway_reuses_the_encoder_pass_and_the_veh_rows_condition(setup):
    *_, model, batch, params = setup
    jaxpr = jax.make_jaxpr(lambda p, b: model.apply(p, b))(params, batch).jaxpr
    # SigLIP's patch conv is the only convolution (the DiT patchifies by reshape): one
    # vision-encoder call feeds both the LLM input and the highway the head conditions on
    assert count_eqns(jaxpr, "conv_general_dilated") == 1
    text_only = {k: v for k, v in batch.items() if k not in ("image", "veh_index")}
    assert count_eqns(jax.make_jaxpr(lambda p, b: model.apply(p, b))(
        params, text_only).jaxpr, "conv_general_dilated") == 0
    cond_fn = jax.jit(lambda p, b: model.conditioning(p, model._forward(p, b), b))
    cond, mask, found = cond_fn(params, batch)
    assert found.all() and cond.shape == (4, K + 16, 32)
    np.testing.assert_array_equal(mask[:, K:].all(1), [False, True, False, True])
    assert mask[:, :K].all()
    # the VEH rows of a row follow its source image, past the LLM
    other = dict(batch, image=batch["image"][::-1])
    cond2, _, _ = cond_fn(params, other)
    np.testing.assert_allclose(cond2[1, K:], cond[3, K:], atol=1e-5)
    assert np.abs(cond2[1, K:] - cond[1, K:]).max() > 1e-3


def test_generation_and_bad_requests(setup):
    _, _, config, model, batch, params = setup
    gen = {k: v for k, v in batch.items() if not k.startswith("gen_")}
    run = lambda **kw: np.asarray(model.generate(  # noqa: E731
        params, gen, jax.random.key(1), steps=3, guidance_scale=2.0, **kw))
    a = run()  # rows 0, 2: text -> image; rows 1, 3: their image through the VEH
    assert a.shape == (4, 8, 8, 1) and np.abs(a).max() <= 1.0
    np.testing.assert_array_equal(a, run())
    with pytest.raises(ValueError, match="needs veh_index >= 0 on every row"):
        run(image_to_image=True)
    with pytest.raises(ValueError, match="needs a model with an image decoder"):
        generate_image(OmniLM(config), params, gen, jax.random.key(0), steps=3,
                       guidance_scale=1.0)
    with pytest.raises(ValueError, match="guidance_scale must be None .* >= 0, got -1.0"):
        model.generate(params, gen, jax.random.key(0), steps=3, guidance_scale=-1.0)
    with pytest.raises(ValueError, match=r"steps must be an int in \[1, num_train_timesteps"):
        model.generate(params, gen, jax.random.key(0), steps=0, guidance_scale=1.0)
    no_image = {k: v for k, v in gen.items() if k not in ("image", "veh_index")}
    no_image["modality"] = np.zeros_like(no_image["modality"])
    with pytest.raises(ValueError, match="image -> image request needs a source image"):
        model.generate(params, no_image, jax.random.key(0), steps=3, guidance_scale=1.0,
                       image_to_image=True)
    cut = dict(gen, input_ids=np.where(gen["input_ids"] == model.gen_id, 0, gen["input_ids"]))
    with pytest.raises(ValueError, match="hold no generation tokens"):
        model.generate(params, cut, jax.random.key(0), steps=3, guidance_scale=1.0)
    with pytest.raises(ValueError, match="decoder.cond_len=5 but the head emits"):
        XVilaHeadConfig(decoder=model.head.decoder.replace(cond_len=5))
    with pytest.raises(ValueError, match="highway rows"):
        XVilaLM(config, model.head.replace(highway_tokens=9,
                                           decoder=model.head.decoder.replace(cond_len=13)),
                model.gen_id)
    assert jnp.isfinite(a).all()


def test_chat_out_needs_an_image_decoder(tmp_path):
    from omni_jax.cli.chat import run_chat
    from omni_jax.recipes import load_recipe

    config = load_recipe("xvila:model=tiny")  # input side only: no output head
    with pytest.raises(ValueError, match="--out .* has no image decoder .*xvila:output=on"):
        run_chat(config, str(tmp_path), "Draw a seven.", out=str(tmp_path / "x.png"))
    assert load_recipe("xvila:model=tiny,output=on").xvila_output.veh


def test_output_stages_freeze_what_the_paper_says(setup):
    """The recipe's output phases against XVilaLM's tree: top-level groups that train."""
    from omni_jax.train.stages import FREEZE, StageConfig, label_tree, param_paths

    *_, params = setup
    paths = jax.tree.leaves(param_paths(params))
    want = {"decoder_align": {"xvila_head", "image_decoder"},
            "x2x_textual": {"llm", "image_adapter", "video_adapter", "audio_adapter",
                            "xvila_head"},
            "x2x_visual": {"highway", "xvila_head", "image_decoder"}}
    for name, groups in want.items():
        labels = jax.tree.leaves(label_tree(params, StageConfig.from_dict(
            {"name": name, **load_stage(name)})))
        trained = {p.split("/")[0] for p, lab in zip(paths, labels) if lab != FREEZE}
        assert trained == groups, name
        head = {p for p, lab in zip(paths, labels) if lab != FREEZE and "xvila_head" in p}
        assert any("veh_" in p for p in head) == (name == "x2x_visual"), name


def test_output_recipe_dry_run_plans_an_xvila_model(setup, tmp_path):
    """`cli.train --config xvila:model=tiny,output=on --dry_run`: the plan's model is an
    XVilaLM; its gen id comes from the tokenizer when one is configured, else gen_token_id."""
    from omni_jax.recipes import load_recipe, model_of
    from omni_jax.recipes.run import run

    tok, *_ = setup
    config = load_recipe("xvila:model=tiny,output=on")
    lines: list[str] = []
    status = run(config, str(tmp_path), dry_run=True, echo=lines.append)
    assert set(status.values()) == {"planned"} and len(status) == 6
    text = "\n".join(lines)
    assert "decoder_align" in text and "[image_decoder, xvila_head]" in text
    assert "[highway, image_decoder, xvila_head]" in text  # x2x_visual
    assert isinstance(model_of(config), XVilaLM) and model_of(config).gen_id == 0
    other = tok.gen_image_id + 1
    config.xvila_output.gen_token_id = other
    assert model_of(config).gen_id == other
    config.tokenizer.path = tok.config.path  # the tokenizer decides; a configured id must agree
    with pytest.raises(ValueError, match=f"gen_token_id={other} but the tokenizer's "
                                         "'<gen_image>'"):
        model_of(config)
    config.xvila_output.gen_token_id = None
    assert model_of(config).gen_id == tok.gen_image_id
    assert not isinstance(model_of(load_recipe("xvila:model=tiny")), XVilaLM)


def test_calibration_standardises_the_generation_token_states(setup, caplog):
    """XVilaLM.calibrate: the head's input shift / scale are the mean and 1 / std of the
    LLM's states at the generation tokens over the rows that have them (a reference from the
    forward pass), set once (needs_calibration), applied on a fresh trainer state only; a
    batch without generation tokens leaves the params as they are."""
    tok, _, config, model, batch, params = setup
    assert model.needs_calibration(params)
    cal = model.calibrate(params, [batch])
    assert not model.needs_calibration(cal)
    hidden = OmniLM(config).module.apply(
        {"params": {k: v for k, v in params.items() if k not in ("xvila_head", "image_decoder")}},
        {k: batch[k] for k in ("input_ids", "modality", "image")})["hidden"]
    rows, found = gather_gen_rows(hidden, jnp.asarray(batch["input_ids"]), tok.gen_image_id, K)
    x = np.asarray(rows, np.float64)[np.asarray(found)]
    assert x.shape == (4, K, config.llm.hidden_size)
    np.testing.assert_allclose(cal[HEAD][IN_SHIFT], x.mean(0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(cal[HEAD][IN_SCALE], 1 / np.sqrt(x.var(0) + 1e-6), rtol=1e-5)
    z = (x - np.asarray(cal[HEAD][IN_SHIFT])) * np.asarray(cal[HEAD][IN_SCALE])
    assert np.abs(z.mean(0)).max() < 1e-4 and np.abs(z.std(0) - 1).mean() < 1e-2
    for k in params:  # nothing else changed
        if k != HEAD:
            assert cal[k] is params[k]
    text = {k: v for k, v in batch.items() if k != "input_ids"}
    text["input_ids"] = np.where(batch["input_ids"] == tok.gen_image_id, tok.pad_id,
                                 batch["input_ids"])
    with caplog.at_level(logging.WARNING):
        assert model.calibrate(params, [text]) is params  # no generation rows: left as is
    assert "input statistics stay uncalibrated" in caplog.text
    c = default_config()
    c.batch_size, c.steps, c.progress_bar, c.tensorboard = 4, 1, False, False
    c.stage = ml_collections.ConfigDict({"name": "decoder_align", **load_stage("decoder_align")})
    trainer = Trainer(c, model)
    state = trainer.restore_or_init(batch, None, params=params,
                                    calibrate=lambda p: model.calibrate(p, [batch]))
    np.testing.assert_allclose(jax.device_get(state["params"][HEAD][IN_SHIFT]),
                               cal[HEAD][IN_SHIFT], rtol=0, atol=1e-6)
