"""TowerConfig.frame_pool: each video frame's adapter tokens average-pooled over k x k blocks
(LLaVA-NeXT-Video's spatial pooling of frames), checked against the unpooled tokens pooled in
numpy; token counts, placeholder expansion, the paper-size (qwen7b) shapes and bad configs.
TowerConfig.frame_embed: a learned per-frame embedding added to each frame's tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.model import OmniModel, tokens_per_item
from omni_jax.omni_config import OmniConfig, TowerConfig

D = 16


def _config(frame_pool: int = 1, adapter: str = "mlp", side: int = 32, frame_embed: bool = False,
            **adapter_config) -> OmniConfig:
    return OmniConfig.from_dict({
        "llm": dict(vocab_size=64, hidden_size=D, intermediate_size=32, num_layers=1,
                    num_heads=2, num_kv_heads=1),
        "image": dict(encoder="siglip", adapter="mlp", adapter_config=dict(out_dim=D),
                      encoder_config=dict(hidden_size=8, intermediate_size=16, num_layers=1,
                                          num_heads=2, image_size=32, patch_size=4),
                      image_size=[32, 32]),
        "video": dict(encoder="shared:image", adapter=adapter,
                      adapter_config=dict(out_dim=D, **adapter_config),
                      image_size=[side, side], num_frames=3, frame_pool=frame_pool,
                      frame_embed=frame_embed)})


@pytest.mark.parametrize("k", [2, 4, 8])
def test_pooled_tokens_are_block_means_of_the_unpooled_ones(k):
    plain, pooled = _config(1), _config(k)  # 32 / 4 = an 8 x 8 grid per frame
    assert tokens_per_item(plain, "video") == 3 * 64
    assert tokens_per_item(pooled, "video") == 3 * (8 // k) ** 2
    video = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 32, 32, 3))
    init = [OmniModel(plain).init(jax.random.PRNGKey(1), m, x, method=OmniModel.encode)
            for m, x in (("video", video), ("image", video[:, 0]))]
    params = {"params": {**init[0]["params"], **init[1]["params"]}}  # frame_pool adds none
    full = np.asarray(OmniModel(plain).apply(params, "video", video, method=OmniModel.encode))
    got = np.asarray(OmniModel(pooled).apply(params, "video", video, method=OmniModel.encode))
    assert full.shape == (2, 3 * 64, D) and got.shape == (2, 3 * (8 // k) ** 2, D)
    grid = full.astype(np.float64).reshape(2, 3, 8, 8, D)  # [video, frame, row, col, D]
    want = np.zeros((2, 3, 8 // k, 8 // k, D))
    for i in range(8 // k):
        for j in range(8 // k):
            want[:, :, i, j] = grid[:, :, i * k:(i + 1) * k, j * k:(j + 1) * k].mean((2, 3))
    np.testing.assert_allclose(got, want.reshape(got.shape), rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[:, 0], got[:, 1])  # frames stay apart, in order
    image = [np.asarray(OmniModel(c).apply(params, "image", video[:, 0],
                                           method=OmniModel.encode)) for c in (plain, pooled)]
    assert image[1].shape == (2, 64, D)  # images are not pooled
    np.testing.assert_array_equal(image[0], image[1])


def test_pooled_video_runs_through_the_model():
    cfg = _config(2)
    n = tokens_per_item(cfg, "video")  # 3 frames x 4 x 4
    ids = jnp.zeros((1, n + 4), jnp.int32)
    modality = jnp.asarray([[0, 0] + [2] * n + [0, 0]], jnp.int32)
    batch = {"input_ids": ids, "modality": modality,
             "video": jax.random.normal(jax.random.PRNGKey(2), (1, 3, 32, 32, 3))}
    model = OmniModel(cfg)
    params = model.init(jax.random.PRNGKey(3), batch)
    out = model.apply(params, batch)
    assert out["logits"].shape == (1, n + 4, 64) and np.isfinite(np.asarray(out["logits"])).all()


def test_paper_size_shapes():
    """capybara at qwen7b (SigLIP 448 / 14 = a 32 x 32 grid, 2 x 2 bilinear -> 16 x 16 tokens
    per frame): frame_pool=2 -> 8 x 8 per frame, abstract shapes only."""
    from omni_jax.recipes.plan import model_of
    from omni_jax.recipes.registry import load_recipe

    c = load_recipe("capybara:model=qwen7b")
    c.model.video.frame_pool = 2
    cfg = model_of(c).config
    frames, side = cfg.video.num_frames, cfg.video.image_size[0]
    assert tokens_per_item(cfg, "video") == frames * 64
    video = jax.ShapeDtypeStruct((1, frames, side, side, 3), jnp.bfloat16)
    params = jax.eval_shape(lambda v: OmniModel(cfg).init(jax.random.PRNGKey(0), "video", v,
                                                          method=OmniModel.encode), video)
    out = jax.eval_shape(lambda p, v: OmniModel(cfg).apply(p, "video", v,
                                                           method=OmniModel.encode),
                         params, video)
    assert out.shape == (1, frames * 64, cfg.llm.hidden_size)


@pytest.mark.parametrize("kwargs,match", [
    (dict(frame_pool=0), "frame_pool must be an int >= 1"),
    (dict(frame_pool=2.0), "frame_pool must be an int >= 1"),
    (dict(frame_pool=3), r"must divide the frame's token grid 8x8"),
    (dict(frame_pool=2, newline="row"), "plain grid"),
    (dict(frame_pool=2, adapter="ola_lgap"), "plain grid"),
])
def test_bad_frame_pool(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _config(**kwargs)


def test_frame_pool_is_for_video_towers():
    with pytest.raises(ValueError, match="on a video tower only"):
        TowerConfig("image", "siglip", "mlp", frame_pool=2)


@pytest.mark.parametrize("k", [1, 2])
def test_frame_embed_adds_each_frames_own_vector(k):
    plain, emb = _config(k), _config(k, frame_embed=True)
    video = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 32, 32, 3))
    init = [OmniModel(emb).init(jax.random.PRNGKey(1), m, x, method=OmniModel.encode)
            for m, x in (("video", video), ("image", video[:, 0]))]
    params = {"params": {**init[1]["params"], **init[0]["params"]}}
    table = params["params"]["video_frame_embed"]
    assert table.shape == (3, D) and not np.any(np.asarray(table))  # zeros: starts as without
    rest = {"params": {n: v for n, v in params["params"].items() if n != "video_frame_embed"}}
    base = np.asarray(OmniModel(plain).apply(rest, "video", video, method=OmniModel.encode))
    np.testing.assert_array_equal(
        np.asarray(OmniModel(emb).apply(params, "video", video, method=OmniModel.encode)), base)
    table = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (3, D)))
    params = {"params": {**params["params"], "video_frame_embed": jnp.asarray(table)}}
    got = np.asarray(OmniModel(emb).apply(params, "video", video, method=OmniModel.encode))
    per = tokens_per_item(emb, "video") // 3  # tokens of one frame
    want = base + np.repeat(table, per, axis=0)[None]  # frame f's tokens + table[f]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    image = np.asarray(OmniModel(emb).apply(params, "image", video[:, 0], method=OmniModel.encode))
    np.testing.assert_array_equal(image, np.asarray(OmniModel(plain).apply(
        rest, "image", video[:, 0], method=OmniModel.encode)))  # images untouched


def test_frame_embed_is_trained_through_the_llm():
    cfg = _config(2, frame_embed=True)
    n = tokens_per_item(cfg, "video")
    batch = {"input_ids": jnp.zeros((1, n + 2), jnp.int32),
             "modality": jnp.asarray([[0] + [2] * n + [0]], jnp.int32),
             "video": jax.random.normal(jax.random.PRNGKey(2), (1, 3, 32, 32, 3))}
    model = OmniModel(cfg)
    params = model.init(jax.random.PRNGKey(3), batch)
    grads = jax.grad(lambda p: model.apply(p, batch)["logits"][0, -1, :4].sum())(params)
    g = np.asarray(grads["params"]["video_frame_embed"])
    assert np.all(np.abs(g).sum(axis=1) > 0)  # every frame's row gets a gradient


def test_frame_embed_paper_size():
    from omni_jax.recipes.plan import model_of
    from omni_jax.recipes.registry import load_recipe

    c = load_recipe("capybara:model=qwen7b")
    c.model.video.frame_embed = True
    cfg = model_of(c).config
    video = jax.ShapeDtypeStruct((1, cfg.video.num_frames, *cfg.video.image_size, 3), jnp.bfloat16)
    params = jax.eval_shape(lambda v: OmniModel(cfg).init(jax.random.PRNGKey(0), "video", v,
                                                          method=OmniModel.encode), video)
    assert params["params"]["video_frame_embed"].shape == (cfg.video.num_frames,
                                                           cfg.llm.hidden_size)


@pytest.mark.parametrize("kwargs,match", [
    (dict(frame_embed=1), "frame_embed must be a bool"),
    (dict(frame_embed=True, adapter="ola_lgap"), "pools the frames itself"),
])
def test_bad_frame_embed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _config(**kwargs)


def test_frame_embed_is_for_video_towers():
    with pytest.raises(ValueError, match="True on a video tower only"):
        TowerConfig("image", "siglip", "mlp", frame_embed=True)
