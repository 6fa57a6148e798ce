"""DiT diffusion image decoder: forward parity with a PyTorch reference, the noise schedules and
DDIM update vs diffusers' formulas (numpy), sampler determinism and guidance, learning on
scikit-learn's digits, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax.core import meta
from torch_dit_ref import TorchDiT, to_flax_params

from omni_jax.decoders import (
    DecoderConfig,
    alphas_cumprod,
    ddim_sample,
    decoder_apply_fn,
    diffusion_loss,
    init_decoder,
)
from omni_jax.decoders.diffusion import ddim_step, ddim_timesteps

TINY = DecoderConfig(image_size=8, channels=3, patch_size=2, hidden=32, layers=2, heads=4,
                     mlp_ratio=2.0, cond_dim=12, cond_len=5, time_freq_dim=32,
                     num_train_timesteps=100)


def inputs(c: DecoderConfig, b: int, seed: int) -> tuple[np.ndarray, ...]:
    """Images in [-1, 1], int timesteps, conditioning with ragged masks (>= 1 valid row)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (b, *c.image_shape)).astype(np.float32)
    t = rng.integers(0, c.num_train_timesteps, b).astype(np.int32)
    cond = rng.standard_normal((b, c.cond_len, c.cond_dim)).astype(np.float32)
    mask = np.arange(c.cond_len)[None] < rng.integers(1, c.cond_len + 1, b)[:, None]
    return x, t, cond, mask


def random_params(c: DecoderConfig, seed: int, std: float = 0.2):
    """Init, then every leaf random (zero-init adaLN / final layer would hide everything)."""
    p = meta.unbox(init_decoder(c, jax.random.key(seed)))
    leaves, tree = jax.tree_util.tree_flatten(p)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return tree.unflatten([std * jax.random.normal(k, v.shape) for k, v in zip(keys, leaves)])


# ---------------------------------------------------------------------------- forward parity

@pytest.mark.parametrize("pos,use_drop", [("sincos", False), ("learned", True)])
def test_forward_matches_torch(pos, use_drop):
    c = TINY.replace(pos_embed=pos)
    torch.manual_seed(0)
    ref = TorchDiT(c).eval()
    with torch.no_grad():  # every weight random, incl. the zero-initialised adaLN / final layer
        for p in ref.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    params = to_flax_params(ref, c)
    x, t, cond, mask = inputs(c, 3, seed=1)
    drop = np.array([False, True, False]) if use_drop else None
    apply = jax.jit(decoder_apply_fn(c))
    ours = apply(params, x, t, cond, mask, drop)
    with torch.no_grad():
        theirs = ref(torch.tensor(x).permute(0, 3, 1, 2), torch.tensor(t), torch.tensor(cond),
                     torch.tensor(mask), None if drop is None else torch.tensor(drop))
    theirs = theirs.permute(0, 2, 3, 1).numpy()
    assert np.abs(theirs).max() > 0.1  # a non-trivial output
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5, rtol=1e-5)
    if use_drop:  # the null item ignores its conditioning; the others do not
        cond2 = cond + 1.0
        ours2 = np.asarray(apply(params, x, t, cond2, mask, drop))
        np.testing.assert_allclose(ours2[1], np.asarray(ours)[1], atol=1e-6)
        assert np.abs(ours2[0] - np.asarray(ours)[0]).max() > 1e-3


def test_init_is_adaln_zero():
    """Fresh params: zero modulation + zero final layer -> the prediction is exactly 0."""
    c = TINY
    x, t, cond, mask = inputs(c, 2, seed=2)
    p = meta.unbox(init_decoder(c, jax.random.key(0)))
    assert float(jnp.abs(jax.jit(decoder_apply_fn(c))(p, x, t, cond, mask)).max()) == 0.0
    boxed = init_decoder(c, jax.random.key(0))["params"]
    assert boxed["block_0"]["attn"]["q"]["kernel"].names == ("embed", "heads", "head_dim")


# ----------------------------------------------------------------- schedule and DDIM (numpy)

def diffusers_acp(c: DecoderConfig) -> np.ndarray:
    """diffusers' betas (float32 torch) for linear / scaled_linear / squaredcos_cap_v2."""
    n = c.num_train_timesteps
    if c.beta_schedule == "linear":
        b = torch.linspace(c.beta_start, c.beta_end, n, dtype=torch.float32)
    elif c.beta_schedule == "scaled_linear":
        b = torch.linspace(c.beta_start ** 0.5, c.beta_end ** 0.5, n, dtype=torch.float32) ** 2
    else:
        f = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
        b = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)],
                         dtype=torch.float32)
    return torch.cumprod(1.0 - b, dim=0).numpy()


def diffusers_step(c: DecoderConfig, acp: np.ndarray, steps: int, out: np.ndarray, t: int,
                   x: np.ndarray, eta: float, noise: np.ndarray) -> np.ndarray:
    """DDIMScheduler.step (set_alpha_to_one, clip_sample, no thresholding) in numpy."""
    prev = t - c.num_train_timesteps // steps
    a_t, a_p = acp[t], acp[prev] if prev >= 0 else 1.0
    b_t = 1 - a_t
    if c.prediction == "epsilon":
        x0, eps = (x - b_t ** 0.5 * out) / a_t ** 0.5, out
    else:
        x0, eps = a_t ** 0.5 * x - b_t ** 0.5 * out, a_t ** 0.5 * out + b_t ** 0.5 * x
    if c.clip_sample:
        x0 = np.clip(x0, -c.clip_range, c.clip_range)
    var = (1 - a_p) / b_t * (1 - a_t / a_p)
    std = eta * var ** 0.5
    x_prev = a_p ** 0.5 * x0 + (1 - a_p - std ** 2) ** 0.5 * eps
    return x_prev + std * noise if eta > 0 else x_prev


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_schedule_matches_diffusers(schedule):
    c = DecoderConfig(num_train_timesteps=1000, beta_schedule=schedule,
                      beta_start=1e-4 if schedule == "linear" else 8.5e-4,
                      beta_end=0.02 if schedule == "linear" else 0.012)
    ours, theirs = alphas_cumprod(c), diffusers_acp(c)
    np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=1e-6)
    assert np.all(np.diff(ours) < 0) and 0 < ours[-1] < ours[0] < 1


@pytest.mark.parametrize("prediction,eta", [("epsilon", 0.0), ("v", 0.0), ("epsilon", 0.7)])
def test_ddim_step_matches_diffusers(prediction, eta):
    c = TINY.replace(prediction=prediction)
    acp, steps = alphas_cumprod(c), 7
    ts, prev = ddim_timesteps(c, steps)
    np.testing.assert_array_equal(ts, np.arange(steps)[::-1] * (100 // steps))  # "leading"
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, *c.image_shape))
    for t, tp in zip(ts, prev):  # every step, incl. the last (a_prev = 1)
        out, noise = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
        a_p = acp[tp] if tp >= 0 else 1.0
        ours = ddim_step(jnp.asarray(x, jnp.float32), jnp.asarray(out, jnp.float32),
                         jnp.float32(acp[t]), jnp.float32(a_p), jnp.asarray(noise, jnp.float32),
                         eta, config=c)
        theirs = diffusers_step(c, acp, steps, out, int(t), x, eta, noise)
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=2e-5)
        x = theirs


def test_ddim_sample_matches_numpy_loop():
    """The jitted fori_loop sampler (guidance 2) == a Python loop of diffusers' step around the
    same model, from the same x_T."""
    c, steps, s = TINY, 4, 2.0
    params = random_params(c, 0)
    _, _, cond, mask = inputs(c, 2, seed=4)
    rng = jax.random.key(5)
    ours = np.asarray(ddim_sample(decoder_apply_fn(c), params, cond, mask, rng, steps, s,
                                  config=c))
    apply = jax.jit(decoder_apply_fn(c))
    x = np.asarray(jax.random.normal(jax.random.split(rng)[0], (2, *c.image_shape)), np.float64)
    acp = alphas_cumprod(c)
    for t in ddim_timesteps(c, steps)[0]:
        tt = jnp.full((2,), t, jnp.int32)
        xx = jnp.asarray(x, jnp.float32)
        cnd = np.asarray(apply(params, xx, tt, cond, mask, jnp.zeros(2, bool)), np.float64)
        unc = np.asarray(apply(params, xx, tt, cond, mask, jnp.ones(2, bool)), np.float64)
        x = diffusers_step(c, acp, steps, unc + s * (cnd - unc), int(t), x, 0.0, None)
    assert np.abs(x).max() > 0.1
    np.testing.assert_allclose(ours, x, atol=1e-5, rtol=1e-5)


def test_ddim_with_exact_denoiser_lands_on_data():
    """With the exact posterior-mean denoiser of a 16-image data set as the model, DDIM (eps
    and v) ends on data points: the schedule, x0 / eps algebra and loop are consistent."""
    from sklearn.datasets import load_digits

    data = jnp.asarray(load_digits().images[:16, ..., None] / 8.0 - 1.0, jnp.float32)
    for prediction in ("epsilon", "v"):
        c = DecoderConfig(image_size=8, channels=1, patch_size=2, hidden=32, cond_dim=4,
                          cond_len=1, num_train_timesteps=200, beta_schedule="cosine",
                          prediction=prediction)
        acp = jnp.asarray(alphas_cumprod(c), jnp.float32)

        def exact(params, x, t, cond, mask, drop=None, c=c, acp=acp):
            a = acp[t][:, None, None, None]
            d2 = jnp.sum((x[:, None] - jnp.sqrt(a)[:, None] * data[None]) ** 2, (2, 3, 4))
            w = jax.nn.softmax(-0.5 * d2 / (1 - a[:, 0, 0]), axis=1)  # [batch, 16]
            x0 = jnp.einsum("bn,nhwc->bhwc", w, data)
            eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
            return eps if c.prediction == "epsilon" else jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0

        out = np.asarray(ddim_sample(exact, None, jnp.zeros((6, 1, 4)), jnp.ones((6, 1), bool),
                                     jax.random.key(0), 10, None, config=c))
        d = ((out[:, None] - np.asarray(data)[None]) ** 2).mean((2, 3, 4))  # [6, 16]
        assert d.min(1).max() < 1e-4 and len(set(d.argmin(1))) > 1


# ------------------------------------------------------------------ sampler: seeds, guidance

def test_sampler_determinism_and_guidance():
    c, steps = TINY, 6
    params, apply = random_params(c, 1), decoder_apply_fn(c)
    _, _, cond, mask = inputs(c, 2, seed=6)
    run = lambda seed, s, eta=0.0: np.asarray(ddim_sample(  # noqa: E731
        apply, params, cond, mask, jax.random.key(seed), steps, s, eta, config=c))
    a = run(0, 3.0)
    np.testing.assert_array_equal(a, run(0, 3.0))  # same seed -> same images
    assert np.abs(a - run(1, 3.0)).mean() > 0.05  # another seed -> other images
    assert np.abs(a - run(0, 0.0)).mean() > 0.02  # guidance changes the output
    np.testing.assert_allclose(run(0, 1.0), run(0, None), atol=2e-5)  # s = 1: conditional
    noisy = run(0, 3.0, 0.5)
    np.testing.assert_array_equal(noisy, run(0, 3.0, 0.5))  # eta > 0 deterministic per seed
    assert np.abs(noisy - a).mean() > 0.02


# ------------------------------------------------------------------------- learning: digits

def test_learns_digits():
    """64 8x8 digits conditioned on a one-hot row (+ a masked padding row): the loss falls
    below half its start, and guided samples sit nearest their own digit's mean image more
    often than chance."""
    from sklearn.datasets import load_digits

    data = load_digits()
    imgs = (data.images / 8.0 - 1.0).astype(np.float32)[..., None]  # [n, 8, 8, 1] in [-1, 1]
    means = np.stack([imgs[data.target == k].mean(0) for k in range(10)])  # [10, 8, 8, 1]
    # init_std ~ 1 / sqrt(hidden): at width 64 the default 0.02 starves the conditioning path
    c = DecoderConfig(image_size=8, channels=1, patch_size=4, hidden=64, layers=2, heads=4,
                      cond_dim=10, cond_len=2, time_freq_dim=64, num_train_timesteps=200,
                      beta_schedule="cosine", cfg_dropout=0.1, init_std=0.125)
    x, y = jnp.asarray(imgs[:64]), data.target[:64]

    def conditioning(labels: np.ndarray) -> tuple[jax.Array, jax.Array]:
        cond = np.zeros((len(labels), 2, 10), np.float32)
        cond[np.arange(len(labels)), 0, labels] = 1.0
        cond[:, 1] = 5.0  # padding row: masked, must not matter
        return jnp.asarray(cond), jnp.asarray(np.tile([True, False], (len(labels), 1)))

    cond, mask = conditioning(y)
    apply = decoder_apply_fn(c)
    params = meta.unbox(init_decoder(c, jax.random.key(0)))
    opt = optax.adam(3e-3)
    state = opt.init(params)
    loss_fn = lambda p, k: diffusion_loss(apply, p, x, cond, mask, k, config=c)  # noqa: E731

    @jax.jit
    def step(p, s, k):
        loss, g = jax.value_and_grad(loss_fn)(p, k)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    evaluate = jax.jit(lambda p: jnp.mean(jax.vmap(lambda k: loss_fn(p, k))(
        jax.random.split(jax.random.key(99), 8))))
    start = float(evaluate(params))
    for i in range(300):
        params, state, _ = step(params, state, jax.random.key(1000 + i))
    end = float(evaluate(params))
    print(f"digits loss {start:.4f} -> {end:.4f}")
    assert end < 0.5 * start

    labels = np.repeat(np.arange(10), 3)
    sc, sm = conditioning(labels)
    samples = np.asarray(ddim_sample(apply, params, sc, sm, jax.random.key(7), 25, 3.0,
                                     config=c))
    dist = ((samples[:, None] - means[None]) ** 2).mean(axis=(2, 3, 4))  # [30, 10]
    acc = float((dist.argmin(1) == labels).mean())
    print(f"nearest-mean accuracy {acc:.2f}")
    assert acc >= 0.4  # chance: 0.1


# ------------------------------------------------------------------------------- bad input

def test_bad_sampler_input():
    c = TINY
    params, apply = random_params(c, 0), decoder_apply_fn(c)
    _, _, cond, mask = inputs(c, 2, seed=7)
    k = jax.random.key(0)
    with pytest.raises(ValueError, match="steps must be an int in"):
        ddim_sample(apply, params, cond, mask, k, 0, 1.0, config=c)
    with pytest.raises(ValueError, match="steps must be an int in"):
        ddim_sample(apply, params, cond, mask, k, c.num_train_timesteps + 1, 1.0, config=c)
    with pytest.raises(ValueError, match="guidance_scale must be"):
        ddim_sample(apply, params, cond, mask, k, 2, -0.5, config=c)
    with pytest.raises(ValueError, match="eta must be"):
        ddim_sample(apply, params, cond, mask, k, 2, 1.0, -1.0, config=c)
    with pytest.raises(ValueError, match="cond must be"):
        ddim_sample(apply, params, cond[..., :-1], mask, k, 2, 1.0, config=c)
    with pytest.raises(ValueError, match="cond_mask must be"):
        ddim_sample(apply, params, cond, mask[:, :-1], k, 2, 1.0, config=c)
    x = jnp.zeros((2, *c.image_shape))
    with pytest.raises(ValueError, match="images must be"):
        diffusion_loss(apply, params, x[:, :-1], cond, mask, k, config=c)
    with pytest.raises(ValueError, match="cond must be"):
        diffusion_loss(apply, params, x, cond[:1], mask, k, config=c)


@pytest.mark.parametrize("field,value,match", [
    ("patch_size", 3, "not divisible by patch_size"),
    ("heads", 5, "not divisible by heads"),
    ("hidden", 0, "hidden must be positive"),
    ("beta_schedule", "sigmoid", "unknown value 'sigmoid'"),
    ("prediction", "x0", "unknown value 'x0'"),
    ("pos_embed", "rope", "unknown value 'rope'"),
    ("cfg_dropout", 1.0, "cfg_dropout must be in"),
    ("beta_end", 5e-5, "beta_start < beta_end"),
    ("time_freq_dim", 31, "time_freq_dim must be even"),
    ("num_train_timesteps", 0, "num_train_timesteps must be positive"),
    ("dtype", "int8", "unknown dtype"),
])
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **{field: value})
    with pytest.raises(ValueError, match="unknown keys"):
        DecoderConfig.from_dict({"hiden": 3})
    assert DecoderConfig.from_dict(TINY.to_dict()) == TINY
