"""A stage's init_from: a module starts from another module's values of the previous stage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.recipes.plan import apply_init_from, check_init_from


def _params():
    k = jax.random.split(jax.random.key(0), 4)
    mlp = lambda a, b: {"fc1": {"kernel": jax.random.normal(a, (4, 8))},  # noqa: E731
                        "fc2": {"kernel": jax.random.normal(b, (8, 4))}}
    return {"image_adapter": mlp(k[0], k[1]), "video_adapter": mlp(k[2], k[3]),
            "llm": {"w": jnp.ones((4, 4))}}


def test_apply_copies_values_without_sharing_buffers():
    p = _params()
    out = apply_init_from(p, {"video_adapter": "image_adapter"})
    for a, b in zip(jax.tree.leaves(out["video_adapter"]), jax.tree.leaves(p["image_adapter"])):
        np.testing.assert_array_equal(a, b)
        assert a is not b and a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
    assert out["image_adapter"] is p["image_adapter"] and out["llm"] is p["llm"]
    assert not np.array_equal(p["video_adapter"]["fc1"]["kernel"], out["video_adapter"]["fc1"]
                              ["kernel"])  # the input is left as it was
    assert apply_init_from(p, {}) is p


def test_check_rejects_bad_specs():
    p = _params()
    check_init_from("video", {"video_adapter": "image_adapter"}, p, first=False)
    with pytest.raises(ValueError, match="first stage"):
        check_init_from("video", {"video_adapter": "image_adapter"}, p, first=True)
    with pytest.raises(ValueError, match="missing: \\['audio_adapter'\\]"):
        check_init_from("video", {"video_adapter": "audio_adapter"}, p, first=False)
    with pytest.raises(ValueError, match="two different"):
        check_init_from("video", {"llm": "llm"}, p, first=False)
    with pytest.raises(ValueError, match="differ in structure or shapes"):
        check_init_from("video", {"llm": "image_adapter"}, p, first=False)
