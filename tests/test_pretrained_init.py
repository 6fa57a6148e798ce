"""Pretrained init: a recipe's stage 1 starts from Hugging Face directories saved locally with
save_pretrained (tiny Qwen2 + SigLIP + Whisper); the frozen parts stay bit-identical to the
converted checkpoints and the LLM's logits equal transformers'; mismatched or missing
checkpoints fail with one clear ValueError before any compute."""

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers

from omni_jax.convert import qwen2, siglip, whisper
from omni_jax.convert.tree import flatten
from omni_jax.omni_config import OmniConfig
from omni_jax.recipes import final_params, load_recipe, make_plan, run
from omni_jax.recipes.init import load_init
from omni_jax.train.omni_model import OmniLM


def save_hf(omni: OmniConfig, root, seed: int = 0) -> dict[str, str]:
    torch.manual_seed(seed)
    dirs = {k: str(root / k) for k in ("llm", "image", "audio")}
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **qwen2.config_to_hf(omni.llm))).save_pretrained(dirs["llm"])
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        **siglip.config_to_hf(omni.image.encoder_config))).save_pretrained(dirs["image"])
    wcfg = whisper.config_to_hf(omni.audio.encoder_config)
    transformers.WhisperModel(transformers.WhisperConfig(
        **wcfg, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32,
        vocab_size=64, max_target_positions=16, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1)).save_pretrained(dirs["audio"])
    return dirs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from omni_jax.data.fixtures import make_fixtures, train_fixture_tokenizer

    root = tmp_path_factory.mktemp("init")
    manifests = make_fixtures(root / "fx", num_images=4, num_audio=2, num_videos=1, num_text=2,
                              use_espeak=False)
    c = load_recipe("capybara:model=tiny")
    c.data_root, c.stage_order = str(root / "fx"), ("phase1a",)
    c.tokenizer.path = train_fixture_tokenizer(manifests, 400, root / "spm")
    c.stages.phase1a.steps, c.stages.phase1a.optim.lr = 2, 1e-2
    c.train.peak_flops, c.train.progress_bar, c.train.tensorboard = 1e9, False, False
    omni = OmniConfig.from_dict(c.model.to_dict())
    dirs = save_hf(omni, root / "hf")
    c.init.update(dirs)
    return root, c, omni, dirs


def test_stage1_starts_from_the_checkpoints_and_frozen_parts_stay_bitwise(setup):
    root, c, omni, dirs = setup
    assert run(c, str(root / "run"), echo=lambda s: None) == {"phase1a": "trained"}
    model = OmniLM(omni)
    plan = make_plan(c, model, count_data=False)[0]
    params = flat = jax.device_get(final_params(str(root / "run"), plan, model))
    imported = {"llm": qwen2.import_qwen2(dirs["llm"])[1]["params"],
                "image_encoder": siglip.import_siglip_vision(dirs["image"])[1]["params"],
                "audio_encoder": whisper.import_whisper_encoder(dirs["audio"])[1]["params"]}
    for part, tree in imported.items():  # phase 1a trains the adapter only
        mine = flatten(params[part])
        for k, v in mine.items():
            np.testing.assert_array_equal(v, flatten(tree)[k], err_msg=f"{part}/{k}")
    ids = np.arange(3, 40, dtype=np.int32)[None]
    ours = model.apply(flat, {"input_ids": ids})["logits"]
    hf = transformers.Qwen2ForCausalLM.from_pretrained(dirs["llm"]).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, rtol=0)
    adapter = flatten(params["image_adapter"])  # fresh, and trained
    fresh = flatten(nn.unbox(model.init(jax.random.key(1), {"input_ids": ids})["params"])[
        "image_adapter"])
    assert any(not np.array_equal(v, fresh[k]) for k, v in adapter.items())


def abstract(omni):
    model = OmniLM(omni)
    return nn.unbox(jax.eval_shape(lambda: model.init(
        jax.random.key(0), {"input_ids": jax.ShapeDtypeStruct((1, 8), np.int32)}))["params"])


def test_bad_init_checkpoints_fail_with_one_message(setup, tmp_path):
    root, c, omni, dirs = setup
    tree = abstract(omni)
    with pytest.raises(ValueError, match="init.llm: '/nonexistent' does not exist"):
        load_init({"llm": "/nonexistent"}, omni, tree)
    with pytest.raises(ValueError, match="holds a siglip_vision checkpoint; expected qwen2"):
        load_init({"llm": dirs["image"]}, omni, tree)
    wide = omni.llm.replace(hidden_size=48, num_layers=3, head_dim=None)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **qwen2.config_to_hf(wide))).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match=r"(?s)hidden_size: checkpoint 48, config 32.*"
                                         r"num_layers: checkpoint 3, config 2.*"
                                         r"embed/embedding: checkpoint shape \(512, 48\)"):
        load_init({"llm": str(tmp_path / "wide")}, omni, tree)
    with pytest.raises(ValueError, match="unknown parts"):
        load_init({"vision": dirs["image"]}, omni, tree)
    with pytest.raises(ValueError, match="no speech generator"):
        load_init({"speech": dirs["llm"]}, omni, tree)
    with pytest.raises(ValueError, match="shares the image encoder; set init.image"):
        load_init({"video": dirs["image"]}, omni, tree)


def test_native_checkpoints_restore_straight_into_the_shardings(setup, tmp_path):
    """init from native checkpoints (cli.convert import-hf): orbax reads each part into the
    trainer's parameter shardings (jax.Arrays, no host tree), values equal to the HF import;
    a native checkpoint of another size fails with the same one-message ValueError."""
    from omni_jax.convert import registry
    from omni_jax.recipes import make_plan
    from omni_jax.recipes.plan import example_batch
    from omni_jax.train.trainer import Trainer

    root, c, omni, dirs = setup
    native = {}
    for part in ("llm", "image", "audio"):
        kind, cfg, params, hf_cfg = registry.import_hf(dirs[part])
        native[part] = str(tmp_path / part)
        registry.save_native(native[part], kind, cfg, params, hf_cfg)
    plan = make_plan(c, OmniLM(omni), count_data=False)[0]
    trainer = Trainer(plan.trainer_config, plan.model)
    trainer._setup(example_batch(plan))
    target = trainer.abstract_state["params"]
    parts = load_init(native, omni, target)
    from_hf = load_init(dirs, omni, abstract(omni))
    for key, tree in parts.items():
        flat, want, ref = flatten(tree), flatten(target[key]), flatten(from_hf[key])
        assert set(flat) == set(want)
        for k, v in flat.items():
            assert isinstance(v, jax.Array) and v.sharding == want[k].sharding, k
            np.testing.assert_array_equal(np.asarray(v), ref[k], err_msg=f"{key}/{k}")
    wide = omni.llm.replace(hidden_size=48, head_dim=None)
    kind, cfg, params, _ = registry.import_hf(_save_llm(wide, tmp_path / "wide_hf"))
    registry.save_native(str(tmp_path / "wide"), kind, cfg, params)
    with pytest.raises(ValueError, match=r"(?s)hidden_size: checkpoint 48, config 32.*"
                                         r"embed/embedding: checkpoint shape \(512, 48\)"):
        load_init({"llm": str(tmp_path / "wide")}, omni, target)


def _save_llm(config, path) -> str:
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **qwen2.config_to_hf(config))).save_pretrained(path)
    return str(path)
