"""OmniModel: placeholder splicing, token counts, text-only equivalence, config/batch errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.llm import Decoder
from omni_jax.model import OmniModel, check_batch, tokens_per_item
from omni_jax.omni_config import OmniConfig

D = 32
LLM = dict(vocab_size=64, hidden_size=D, intermediate_size=48, num_layers=2, num_heads=4,
           num_kv_heads=2, max_position_embeddings=128)
SIGLIP = dict(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, image_size=32,
              patch_size=8)


def config(**towers):
    base = {
        "llm": LLM,
        "image": dict(encoder="siglip", encoder_config=SIGLIP, adapter="mlp_2x2",
                      adapter_config=dict(out_dim=D), image_size=[32, 32]),
        "video": dict(encoder="shared:image", adapter="ola_lgap", adapter_config=dict(out_dim=D),
                      image_size=[32, 32], num_frames=2),
        "highway": dict(out_dim=8),
    }
    base.update(towers)
    return OmniConfig.from_dict({k: v for k, v in base.items() if v is not None})


def layout(rows):
    """rows: list of lists of (modality_code, count) -> modality [batch, seq]."""
    seqs = [np.concatenate([np.full(n, code, np.int32) for code, n in row]) for row in rows]
    return np.stack(seqs)


@pytest.fixture(scope="module")
def model_and_params():
    cfg = config()
    ti, tv = tokens_per_item(cfg, "image"), tokens_per_item(cfg, "video")
    mod = layout([[(0, 3), (1, ti), (0, 2), (2, tv), (0, 5)],
                  [(0, 1), (1, ti), (0, 4 + tv), (0, 5)]])
    rng = np.random.default_rng(0)
    batch = {"input_ids": jnp.asarray(rng.integers(0, 64, mod.shape), jnp.int32),
             "modality": jnp.asarray(mod),
             "image": jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32),
             "video": jnp.asarray(rng.normal(size=(1, 2, 32, 32, 3)), jnp.float32)}
    model = OmniModel(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), batch))
    return cfg, model, params, batch


def test_token_counts_follow_the_adapters_rules(model_and_params):
    cfg = model_and_params[0]
    grid = 32 // 8  # 4x4 patches
    assert tokens_per_item(cfg, "image") == (grid // 2) ** 2  # 2x2 bilinear reduction
    pooled = grid // 2  # LGAP 2x2 windows; Ola video: BEGIN, per frame rows+NEWLINE then SEP, END
    assert tokens_per_item(cfg, "video") == 2 + 2 * (pooled * (pooled + 1) + 1)


def test_placeholders_hold_each_items_adapter_output(model_and_params):
    cfg, model, params, batch = model_and_params
    x = np.asarray(model.apply(params, batch, method=OmniModel.embed_inputs))
    img = np.asarray(model.apply(params, "image", batch["image"], method=OmniModel.encode))
    vid = np.asarray(model.apply(params, "video", batch["video"], method=OmniModel.encode))
    mod = np.asarray(batch["modality"])
    np.testing.assert_array_equal(x[0][mod[0] == 1], img[0])  # first image: row 0
    np.testing.assert_array_equal(x[1][mod[1] == 1], img[1])  # second image: row 1
    np.testing.assert_array_equal(x[0][mod[0] == 2], vid[0])
    tok = np.asarray(model.apply(params, batch["input_ids"],
                                 method=lambda m, i: m.llm.embed_tokens(i)))
    np.testing.assert_array_equal(x[mod == 0], tok[mod == 0])  # text untouched
    assert not np.allclose(img[0], img[1])


def test_highway_sits_next_to_the_llm_output(model_and_params):
    cfg, model, params, batch = model_and_params
    out = model.apply(params, batch)
    assert out["highway"].shape == (2, 16, 8)  # one row per patch of each image, decoder width
    assert out["logits"].shape == (*batch["input_ids"].shape, 64)
    # the highway reads the features of the encoder pass the LLM input used: the vision
    # tower's patch convolution appears once per modality in the whole jaxpr
    jaxpr = str(jax.make_jaxpr(lambda p, b: model.apply(p, b))(params, batch))
    assert jaxpr.count("conv_general_dilated") == 2  # image + video (shared tower), no extra
    feats = model.apply(params, "image", batch["image"],
                        method=lambda m, mod, px: m.visual_features(mod, px))
    ref = model.apply(params, *feats, method=lambda m, f, g: m.highway(f, g))
    np.testing.assert_array_equal(np.asarray(out["highway"]), np.asarray(ref))


def test_text_only_batch_equals_the_bare_llm(model_and_params):
    cfg, model, params, _ = model_and_params
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 9)), jnp.int32)
    seg = jnp.asarray([[1] * 9, [1] * 6 + [0] * 3], jnp.int32)
    ours = model.apply(params, {"input_ids": ids, "segment_ids": seg})["logits"]
    bare = Decoder(cfg.llm).apply({"params": params["params"]["llm"]}, ids, segment_ids=seg)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(bare["logits"]))
    text_model = OmniModel(OmniConfig.from_dict({"llm": LLM}))
    p = text_model.init(jax.random.key(1), {"input_ids": ids})
    assert set(p["params"]) == {"llm"}


def test_bad_batches_are_refused_before_compute(model_and_params):
    cfg, model, params, batch = model_and_params
    bad = dict(batch, modality=batch["modality"].at[0, 0].set(1))  # one stray image position
    with pytest.raises(ValueError, match=r"\d+ image placeholder positions, which is not a whole"):
        check_batch(cfg, bad)
    with pytest.raises(ValueError, match="no video array"):
        check_batch(cfg, {k: v for k, v in batch.items() if k != "video"})
    with pytest.raises(ValueError, match="exceeds the model's maximum 128"):
        check_batch(cfg, {"input_ids": np.zeros((1, 129), np.int32)})
    with pytest.raises(ValueError, match="model has no audio tower"):
        check_batch(cfg, dict(batch, audio=np.zeros((1, 80, 100), np.float32)))
    with pytest.raises(ValueError,
                       match=r"image must be \[n, H, W, 3\] with \(H, W\) = \(32, 32\)"):
        model.apply(params, dict(batch, image=jnp.zeros((2, 16, 16, 3))))


@pytest.mark.parametrize("change, match", [
    (dict(image=dict(encoder="siglip", encoder_config=SIGLIP, adapter="qformer",
                     adapter_config={}, image_size=[32, 32])), "unknown adapter 'qformer'"),
    (dict(image=dict(encoder="clip", adapter="mlp", image_size=[32, 32])), "unknown encoder"),
    (dict(image=dict(encoder="siglip", encoder_config=SIGLIP, adapter="mlp",
                     adapter_config=dict(out_dim=D + 1), image_size=[32, 32])),
     "out_dim=33 must equal the LLM hidden_size=32"),
    (dict(image=None), "shares the encoder of 'image'"),
    (dict(audio=dict(encoder="siglip", encoder_config=SIGLIP, adapter="mlp",
                     adapter_config=dict(out_dim=D), num_frames=10)), "serves"),
])
def test_bad_configs(change, match):
    with pytest.raises(ValueError, match=match):
        config(**change)
