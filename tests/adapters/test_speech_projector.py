"""Speech projector: token counts, frame stacking vs numpy, layout vectors, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from omni_jax.adapters.speech_projector import (
    SPEECH_PRESETS,
    SpeechProjector,
    SpeechProjectorConfig,
    stack_frames,
)


def cfg(**kw) -> SpeechProjectorConfig:
    return SpeechProjectorConfig(**{"in_dim": 6, "out_dim": 8, "hidden_dim": 12, **kw})


def numpy_projector(x: np.ndarray, p: dict, k: int, remainder: str) -> np.ndarray:
    """x [chunks, T, C] -> [chunks, per, D], frames t*k..t*k+k-1 concatenated in order."""
    chunks, t, c = x.shape
    rows = []
    for ch in range(chunks):
        frames = list(x[ch])
        if t % k and remainder == "pad":
            frames += [np.zeros(c)] * (k - t % k)
        per = len(frames) // k
        rows.append([np.concatenate(frames[i * k:(i + 1) * k]) for i in range(per)])
    s = np.asarray(rows)
    h = np.maximum(s @ p["linear1"]["kernel"] + p["linear1"]["bias"], 0)
    return h @ p["linear2"]["kernel"] + p["linear2"]["bias"]


def test_num_tokens():
    ola = cfg(**SPEECH_PRESETS["ola"])
    oo = cfg(**SPEECH_PRESETS["openomni"])
    assert ola.num_tokens(1500, 1) == 150 + 1 + 2
    assert ola.num_tokens(1500, 3) == 3 * 151 + 2
    assert oo.num_tokens(1500, 1) == 300 and oo.num_tokens(1500, 2) == 600
    assert cfg(stack=4).num_tokens(10, 2) == 2 * (3 + 1) + 2  # pad: ceil(10/4) = 3
    assert cfg(stack=4, remainder="drop").num_tokens(10, 2) == 2 * (2 + 1) + 2
    with pytest.raises(ValueError, match="num_chunks >= 1"):
        ola.num_tokens(1500, 0)


@pytest.mark.parametrize("kw", [
    {"stack": 4, "special_vectors": True, "remainder": "pad"},
    {"stack": 4, "special_vectors": True, "remainder": "drop"},
    {"stack": 5, "special_vectors": False, "remainder": "pad"},
])
def test_matches_numpy_and_layout(kw):
    c = cfg(**kw)
    x = np.random.default_rng(0).normal(size=(2, 3, 10, 6)).astype(np.float32)  # 2 items
    model = SpeechProjector(c)
    params = meta.unbox(model.init(jax.random.key(0), jnp.asarray(x)))
    params = jax.tree.map(lambda a: a + 0.1, params)  # non-zero biases
    out = np.asarray(model.apply(params, jnp.asarray(x)))
    p = jax.tree.map(np.asarray, params["params"])
    assert out.shape == (2, c.num_tokens(10, 3), 8)
    per = c.tokens_per_chunk(10)
    for b in range(2):
        ref = numpy_projector(x[b], p, c.stack, c.remainder)  # [chunks, per, D]
        if not c.special_vectors:
            np.testing.assert_allclose(out[b], ref.reshape(-1, 8), atol=1e-5)
            continue
        np.testing.assert_array_equal(out[b, 0], p["speech_begin"])
        np.testing.assert_array_equal(out[b, -1], p["speech_end"])
        for ch in range(3):
            start = 1 + ch * (per + 1)
            np.testing.assert_allclose(out[b, start:start + per], ref[ch], atol=1e-5)
            np.testing.assert_array_equal(out[b, start + per], p["speech_newline"])
    # single item (no batch axis) gives the same as its batch row
    one = np.asarray(model.apply(params, jnp.asarray(x[1])))
    np.testing.assert_allclose(one, out[1], atol=1e-6)


def test_stack_frames_order():
    x = jnp.arange(2 * 5 * 3).reshape(1, 2, 5, 3)  # [b, chunks, T=5, C=3]
    s = np.asarray(stack_frames(x, 2, "pad"))
    assert s.shape == (1, 2, 3, 6)
    np.testing.assert_array_equal(s[0, 0, 1], np.concatenate([x[0, 0, 2], x[0, 0, 3]]))
    np.testing.assert_array_equal(s[0, 1, 2], np.concatenate([x[0, 1, 4], np.zeros(3)]))
    assert stack_frames(x, 2, "drop").shape == (1, 2, 2, 6)


def test_vector_init_std():
    c = cfg(out_dim=4096, hidden_dim=4, in_dim=2, stack=1)
    p = SpeechProjector(c).init(jax.random.key(0), jnp.zeros((1, 1, 2)))
    v = np.asarray(meta.unbox(p)["params"]["speech_newline"])
    assert abs(v.std() - 4096 ** -0.5) < 0.1 * 4096 ** -0.5


def test_errors():
    with pytest.raises(ValueError, match="remainder: unknown value 'trim'"):
        cfg(remainder="trim")
    with pytest.raises(ValueError, match="stack must be positive"):
        cfg(stack=0)
    with pytest.raises(ValueError, match="unknown keys \\['k'\\]"):
        SpeechProjectorConfig.from_dict({"k": 5})
    model = SpeechProjector(cfg(stack=4, remainder="drop"))
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 6)))
    with pytest.raises(ValueError, match="expected 6 input channels, got 5"):
        model.apply(params, jnp.zeros((1, 8, 5)))
    with pytest.raises(ValueError, match="got shape \\(8, 6\\)"):
        model.apply(params, jnp.zeros((8, 6)))
    with pytest.raises(ValueError, match="3 frames per chunk give no token"):
        model.apply(params, jnp.zeros((1, 3, 6)))
    with pytest.raises(ValueError, match="floating point"):
        model.apply(params, jnp.zeros((1, 8, 6), jnp.int32))
