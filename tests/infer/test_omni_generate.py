"""generate_omni on a tiny omni model (SigLIP image + Whisper audio towers): greedy tokens equal
a slow reference (full forwards without a cache), text-only equals infer.generate on the bare
LLM, streaming equals the compiled loop, the decode step runs no tower, bad input errors."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.configs.models import tiny as tiny_model  # noqa: E402
from omni_jax.infer.generate import SamplingConfig, generate
from omni_jax.infer.omni import _token_logits, collate_prompts, generate_omni, stream_omni
from omni_jax.llm import Decoder
from omni_jax.model import OmniModel, tokens_per_item
from omni_jax.omni_config import MODALITY_CODE, OmniConfig
from omni_jax.train.omni_model import OmniLM

NEW = 6


@pytest.fixture(scope="module")
def tiny():
    """Tiny omni model with peaked logits (so greedy ties cannot flip) and strong adapters
    (so the media visibly change the answer)."""
    d = tiny_model.get_config("mlp").to_dict()
    d["llm"].update(initializer_range=0.3, max_position_embeddings=128)
    del d["video"]
    config = OmniConfig.from_dict(d)
    params = nn.unbox(jax.jit(lambda: OmniLM(config).init(
        jax.random.key(0), {"input_ids": jnp.zeros((1, 8), jnp.int32)}))())["params"]
    params = {k: (jax.tree.map(lambda x: 20.0 * x, v) if k.endswith("_adapter") else v)
              for k, v in params.items()}
    return OmniModel(config), {"params": params}


def prompt(config, rng, n_text, modality=None):
    """A batch of one prompt: random text ids around one media item's placeholders."""
    ids = rng.integers(1, config.llm.vocab_size, size=n_text)
    mod = np.zeros(n_text, np.int32)
    out = {}
    if modality is not None:
        k = tokens_per_item(config, modality)
        ids = np.concatenate([ids[:2], np.full(k, 7), ids[2:]])
        mod = np.concatenate([mod[:2], np.full(k, MODALITY_CODE[modality]), mod[2:]])
        shape = {"image": (1, 32, 32, 3), "audio": (1, 80, 100)}[modality]
        out[modality] = rng.normal(size=shape).astype(np.float32)
    return {"input_ids": ids[None].astype(np.int32), "modality": mod[None], **out}


@pytest.fixture(scope="module")
def media_batch(tiny):
    """Row 0: image + 5 text tokens (the longer); row 1: audio + 3 text (left-padded)."""
    rng = np.random.default_rng(0)
    config = tiny[0].config
    return collate_prompts([prompt(config, rng, 5, "image"), prompt(config, rng, 3, "audio")],
                           pad_id=0)


def slow_greedy(model, variables, batch, new):
    """Full forward (no cache) per step over a fixed right-padded buffer; argmax, append."""
    b, p = batch["input_ids"].shape
    ids = np.pad(batch["input_ids"], ((0, 0), (0, new)))
    mod = np.pad(batch["modality"], ((0, 0), (0, new)))
    seg = np.pad(batch.get("segment_ids", np.ones((b, p), np.int32)), ((0, 0), (0, new)))
    media = {k: batch[k] for k in ("image", "audio") if k in batch}
    fwd = jax.jit(lambda ids, seg: model.apply(variables, {
        **media, "input_ids": ids, "modality": mod, "segment_ids": seg,
        "positions": jnp.maximum(jnp.cumsum(seg, axis=-1) - 1, 0)})["logits"])
    gaps = []
    for t in range(new):
        logits = np.asarray(fwd(ids, seg))[:, p + t - 1]
        top2 = np.sort(logits, axis=-1)[:, -2:]
        gaps.append(top2[:, 1] - top2[:, 0])
        ids[:, p + t], seg[:, p + t] = logits.argmax(-1), 1
    return ids[:, p:], np.min(gaps)


def test_greedy_with_image_and_audio_equals_slow_reference(tiny, media_batch):
    model, variables = tiny
    ref, gap = slow_greedy(model, variables, media_batch, NEW)
    assert gap > 1e-3  # no near-ties: argmax is decided
    got = generate_omni(model, variables, media_batch, max_new_tokens=NEW, eos_id=None)
    np.testing.assert_array_equal(np.asarray(got), ref)
    # the media matter: other pixels / mel frames change the answer of each row
    other = {**media_batch, "image": -media_batch["image"], "audio": -media_batch["audio"]}
    changed = np.asarray(generate_omni(model, variables, other, max_new_tokens=NEW, eos_id=None))
    assert (changed != ref).any(axis=1).all()


def test_eos_stops_rows_and_the_loop(tiny, media_batch):
    model, variables = tiny
    full = np.asarray(generate_omni(model, variables, media_batch, max_new_tokens=NEW,
                                    eos_id=None))
    eos = int(full[0, 1])  # row 0's second token
    got = np.asarray(generate_omni(model, variables, media_batch, max_new_tokens=NEW,
                                   eos_id=eos, pad_id=3))
    np.testing.assert_array_equal(got[0, :2], full[0, :2])
    assert (got[0, 2:] == 3).all()  # pads after row 0's EOS
    hit = np.nonzero(full[1] == eos)[0]
    stop = int(hit[0]) + 1 if len(hit) else NEW  # the loop ends when both rows are done
    assert got.shape == (2, max(2, stop))
    np.testing.assert_array_equal(got[1, :stop], full[1, :stop])
    # several EOS ids: a row stops at the first of any
    stops = (int(full[1, 0]), int(full[0, 3]))
    got2 = np.asarray(generate_omni(model, variables, media_batch, max_new_tokens=NEW,
                                    eos_id=stops, pad_id=3))
    for row in range(2):
        end = int(np.argmax(np.isin(full[row], stops))) + 1 if np.isin(full[row], stops).any() \
            else NEW
        np.testing.assert_array_equal(got2[row, :end], full[row, :end])
        assert (got2[row, end:] == 3).all()
    assert got2.shape[1] == max(int(np.argmax(np.isin(r, stops))) + 1 for r in full)
    # max_new_tokens=None: runs to EOS (or the end of the cache): the same tokens
    p = media_batch["input_ids"].shape[1]
    out = np.asarray(generate_omni(model, variables, media_batch, max_new_tokens=None,
                                   eos_id=eos, pad_id=3, max_len=p + NEW))
    np.testing.assert_array_equal(out, got)


def test_stream_yields_the_same_tokens(tiny, media_batch):
    model, variables = tiny
    kw = dict(max_new_tokens=NEW, eos_id=None,
              sampling=SamplingConfig(greedy=False, temperature=2.0, top_k=20),
              rng=jax.random.key(5), vocab_limit=100)
    want = np.asarray(generate_omni(model, variables, media_batch, **kw))
    assert want.max() < 100 and len(np.unique(want)) > 3  # sampled, within the limit
    steps = list(stream_omni(model, variables, media_batch, **kw))
    assert len(steps) == NEW and steps[0].shape == (2,)
    np.testing.assert_array_equal(np.stack(steps, axis=1), want)


def test_text_only_equals_llm_generate(tiny):
    model, variables = tiny
    rng = np.random.default_rng(3)
    ids = rng.integers(1, 512, size=(2, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3], ids[1, :3] = 0, 0
    llm_out = generate(Decoder(model.config.llm), {"params": variables["params"]["llm"]},
                       jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=NEW)
    got = generate_omni(model, variables, {"input_ids": ids, "segment_ids": mask},
                        max_new_tokens=NEW, eos_id=None)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(llm_out["tokens"]))


def test_decode_step_runs_no_tower(tiny, media_batch):
    """The prefill with media convolves pixels (SigLIP patches) and mel frames (Whisper); the
    decode step feeds text only: its program has no convolution at all."""
    model, variables = tiny
    from omni_jax.infer.omni import _prefill

    dev = {k: jnp.asarray(v) for k, v in media_batch.items()}
    dev["positions"] = jnp.maximum(jnp.cumsum(dev["segment_ids"], -1) - 1, 0)
    pre = str(jax.make_jaxpr(lambda v, b: _prefill(model, v, b, max_len=24,
                                                   cache_dtype=jnp.float32))(variables, dev))
    assert pre.count("conv_general_dilated") >= 2
    c = model.config.llm
    from omni_jax.layers.attention import init_cache

    cache = init_cache(2, 24, c.num_kv_heads, c.head_dim, c.num_layers)
    step = str(jax.make_jaxpr(lambda v, t, p, k: _token_logits(model, v, t, p, k))(
        variables, jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.int32), cache))
    assert "conv_general_dilated" not in step


def test_bad_input_errors(tiny, media_batch):
    model, variables = tiny
    kw = dict(max_new_tokens=NEW, eos_id=None)
    with pytest.raises(ValueError, match="max_len=20 is too small: the cache must hold "
                                         "prompt_len 21 \\+ max_new_tokens 6 = 27"):
        generate_omni(model, variables, media_batch, max_len=20, **kw)
    with pytest.raises(ValueError, match="give max_new_tokens or eos_id"):
        generate_omni(model, variables, media_batch, max_new_tokens=None, eos_id=None)
    with pytest.raises(ValueError, match="max_len 200 .* exceeds max_position_embeddings 128"):
        generate_omni(model, variables, media_batch, max_len=200, **kw)
    video = {**media_batch, "video": np.zeros((1, 2, 32, 32, 3), np.float32)}
    with pytest.raises(ValueError, match="batch has video inputs but the model has no video "
                                         "tower"):
        generate_omni(model, variables, video, **kw)
    no_image = {k: v for k, v in media_batch.items() if k != "image"}
    with pytest.raises(ValueError, match="16 image placeholder positions but no image array"):
        generate_omni(model, variables, no_image, **kw)
    with pytest.raises(ValueError, match="media arrays but no 'modality'"):
        generate_omni(model, variables, {k: v for k, v in media_batch.items()
                                         if k != "modality"}, **kw)
    with pytest.raises(ValueError, match="segment_ids must be a 0/1 mask"):
        generate_omni(model, variables, {**media_batch,
                                         "segment_ids": 2 * media_batch["segment_ids"]}, **kw)
    with pytest.raises(ValueError, match="eos_id=512 is outside the vocabulary"):
        generate_omni(model, variables, media_batch, max_new_tokens=2, eos_id=512)
    with pytest.raises(ValueError, match="eos_id=-1 is outside the vocabulary"):
        generate_omni(model, variables, media_batch, max_new_tokens=2, eos_id=(3, -1))
    with pytest.raises(ValueError, match="vocab_limit must be an int in \\[1, 512\\]"):
        generate_omni(model, variables, media_batch, vocab_limit=513, **kw)
    with pytest.raises(ValueError, match="sampling \\(greedy=False\\) needs an rng key"):
        stream_omni(model, variables, media_batch, sampling=SamplingConfig(greedy=False), **kw)
    with pytest.raises(ValueError, match="variables must be a mapping \\{'params'"):
        generate_omni(model, variables["params"], media_batch, **kw)
