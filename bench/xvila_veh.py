"""X-VILA output side on scikit-learn's 8x8 digits, driven by the tiny LLM (width 32, 2 layers).

(1) text -> image: "Draw a seven." -> K generation tokens -> output projection -> DiT. Trained
    as the recipe's decoder_align stage (LLM frozen: a random LLM's generation-token states
    carry the digit as ~5% of their spread), and with the LLM trained too (x2x_textual's
    trainable set + the decoder, same steps / lr). A LogisticRegression digit classifier,
    fit on the real train-split images (held-out accuracy reported), reads every generated
    image: the share recognised as the requested digit.
(2) the VEH claim: image -> image "Reproduce this image." with and without the visual embedding
    highway, the same trainable set otherwise (LLM, image adapter, output projection, decoder)
    and the same steps / batch / lr / seeds; PSNR and SSIM (7x7-free: 3x3 uniform windows,
    skimage's formula, data range 1) of reproductions of held-out test-split images vs input.

    .venv/bin/python bench/xvila_veh.py [--quick] [--out bench/results/xvila_veh.json]

(3) video -> next frame: two frames of consecutive digits (d, d + 1) -> an image of d + 2,
    through the LLM (LLM, video adapter, output projection, decoder trained); the classifier
    reads the generated frames of held-out test-split digits.

    .venv/bin/python bench/xvila_veh.py [--quick] [--out bench/results/xvila_veh.json]

Measured (--steps 800 --t2i_steps 2400 --batch 32 --ddim 20 --lr 3e-3, CPU, ~9 min): text ->
image 0.982 with the LLM frozen and the head's input calibrated (0.306 uncalibrated, 0.929 with
the LLM trained too); VEH 26.7 dB / SSIM 0.962 (same digit 0.944) vs 8.7 dB / 0.236 without;
video -> next frame 0.071 (chance 0.1: the tiny random LLM does not learn to read the frames and
add one in 2400 steps). A run whose tokenizer lacked the video prompt gave 0.965 / 0.282 / 0.406
and 25.4 vs 8.7 dB: the LLM-trained variant is the fragile one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np
from flax import linen as nn

from omni_jax.configs.models import tiny
from omni_jax.configs.recipes import xvila as recipe
from omni_jax.data.fixtures import DIGIT_WORDS
from omni_jax.data.omni_digits.tasks import load_images, split_images
from omni_jax.data.template import ChatTemplate, TemplateConfig
from omni_jax.data.tokenizer import (
    DEFAULT_SPECIAL_TOKENS,
    TokenizerConfig,
    load_tokenizer,
    train_sentencepiece,
)
from omni_jax.decoders.xvila import XVilaHeadConfig
from omni_jax.model import tokens_per_item
from omni_jax.omni_config import OmniConfig
from omni_jax.train.trainer import Trainer, default_config
from omni_jax.train.xvila_model import XVilaLM, image_to_unit, make_gen_batch

K, SEQ, VIDEO_SEQ = 4, 64, 96
DRAW = ("Draw a {w}.", "Show me the digit {w}.", "Generate an image of {w}.")
COPY = "Reproduce this image."
NEXT = "Draw the next frame."


# ---- metrics ------------------------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image PSNR (dB), images in [0, 1]: [n, ...] -> [n]."""
    mse = np.mean((a - b).reshape(len(a), -1) ** 2, axis=1)
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-10))


def ssim(a: np.ndarray, b: np.ndarray, win: int = 3) -> np.ndarray:
    """Per image SSIM of [n, H, W] in [0, 1]: skimage's structural_similarity (uniform
    win x win windows, sample covariances, K1 = 0.01, K2 = 0.03, data range 1, mean over the
    valid window positions)."""
    c1, c2, np_ = 0.01 ** 2, 0.03 ** 2, win * win
    cov = np_ / (np_ - 1)

    def filt(x: np.ndarray) -> np.ndarray:  # mean over each valid win x win window
        v = np.lib.stride_tricks.sliding_window_view(x, (win, win), axis=(1, 2))
        return v.mean(axis=(-2, -1))

    ux, uy = filt(a), filt(b)
    vx, vy = cov * (filt(a * a) - ux * ux), cov * (filt(b * b) - uy * uy)
    vxy = cov * (filt(a * b) - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return s.reshape(len(a), -1).mean(1)


def classifier(pixels: np.ndarray, labels: np.ndarray, split: dict) -> tuple[object, float]:
    """LogisticRegression on the real train images (ink in [0, 1]) -> (model, test accuracy)."""
    from sklearn.linear_model import LogisticRegression

    x = pixels.reshape(len(pixels), -1) / 255.0
    clf = LogisticRegression(max_iter=3000, C=1.0).fit(x[split["train"]], labels[split["train"]])
    return clf, float(clf.score(x[split["test"]], labels[split["test"]]))


# ---- data -----------------------------------------------------------------------------------
def decoder_space(pixels: np.ndarray) -> np.ndarray:
    """uint8 ink [n, 8, 8] -> the decoder's [n, 8, 8, 1] in [-1, 1]."""
    return (pixels[..., None] / 127.5 - 1.0).astype(np.float32)


def encoder_space(pixels: np.ndarray, side: int) -> np.ndarray:
    """uint8 ink [n, 8, 8] -> SigLIP input [n, side, side, 3] (nearest upsampling, [-1, 1])."""
    r = side // pixels.shape[1]
    x = np.kron(pixels / 127.5 - 1.0, np.ones((r, r)))
    return np.repeat(x[..., None], 3, -1).astype(np.float32)


class Digits:
    """Tokenizer, template and batch makers for the two tasks."""

    def __init__(self, workdir: str, config: OmniConfig) -> None:
        texts = [p.format(w=w) for p in DRAW for w in DIGIT_WORDS] + [COPY, NEXT]
        path = train_sentencepiece(texts * 20, 320, os.path.join(workdir, "sp"),
                                   special_tokens=(*DEFAULT_SPECIAL_TOKENS, "<gen_image>"))
        self.tok = load_tokenizer(TokenizerConfig(path=str(path), gen_image_token="<gen_image>"))
        self.tpl = ChatTemplate(self.tok, TemplateConfig(default_system_prompt=None,
                                                         gen_image_tokens=K))
        self.n_img, self.side = tokens_per_item(config, "image"), config.image.image_size[0]
        self.n_vid = tokens_per_item(config, "video")
        self.pixels, self.labels = load_images()

    def t2i(self, digits: np.ndarray, rng: np.random.Generator, idx: np.ndarray | None,
            seed0: int) -> dict:
        exs = [self.tpl.encode([
            {"role": "user", "content": DRAW[rng.integers(len(DRAW))].format(w=DIGIT_WORDS[d])},
            {"role": "assistant", "content": [{"type": "gen_image"}]}]) for d in digits]
        targets = None if idx is None else decoder_space(self.pixels[idx])
        return make_gen_batch(exs, SEQ, self.tok.pad_id, targets=targets,
                              seeds=seed0 + np.arange(len(digits)))

    def v2i(self, firsts: np.ndarray, rng: np.random.Generator, pool: np.ndarray,
            seed0: int, targets: bool = True) -> tuple[dict, np.ndarray]:
        """Videos of two consecutive digits (d, d + 1: the tower's frames) from `pool`, the
        target an image of d + 2 -> (batch, the wanted digits)."""
        def pick(d: int) -> int:
            cands = pool[self.labels[pool] == d % 10]
            return int(cands[rng.integers(cands.size)])

        ex = self.tpl.encode([
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": NEXT}]},
            {"role": "assistant", "content": [{"type": "gen_image"}]}],
            {"video": [self.n_vid]})
        frames = np.array([[pick(d), pick(d + 1)] for d in firsts])
        want = (firsts + 2) % 10
        tgt = decoder_space(self.pixels[[pick(d) for d in want]]) if targets else None
        batch = make_gen_batch([ex] * len(firsts), VIDEO_SEQ, self.tok.pad_id, targets=tgt,
                               seeds=seed0 + np.arange(len(firsts)))
        vid = encoder_space(self.pixels[frames.reshape(-1)], self.side)
        batch["video"] = vid.reshape(len(firsts), 2, *vid.shape[1:])
        return batch, want

    def i2i(self, idx: np.ndarray, seed0: int, targets: bool = True) -> dict:
        ex = self.tpl.encode([
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": COPY}]},
            {"role": "assistant", "content": [{"type": "gen_image"}]}],
            {"image": [self.n_img]})
        px = self.pixels[idx]
        return make_gen_batch([ex] * len(idx), SEQ, self.tok.pad_id,
                              targets=decoder_space(px) if targets else None,
                              seeds=seed0 + np.arange(len(idx)),
                              images=encoder_space(px, self.side))


# ---- training -------------------------------------------------------------------------------
def train(model: XVilaLM, trainable: list[str], make_batch, steps: int, batch: int, lr: float,
          seed: int, calibrated: bool = True) -> tuple[dict, list[float], float]:
    """Fresh params (the head's input calibrated on 4 fresh batches, as recipes.run does on
    the stage's first ones), then the trainer on `steps` batches of make_batch(step) ->
    (params, losses, seconds)."""
    c = default_config()
    c.batch_size, c.steps, c.progress_bar, c.tensorboard, c.seed = batch, steps, False, False, \
        seed
    c.stage = ml_collections.ConfigDict({"name": "bench", "trainable": tuple(trainable),
                                         "lr_groups": {}, "losses": {"diffusion": 1.0}})
    c.optim.lr, c.optim.warmup_steps, c.optim.schedule = lr, min(50, steps // 10), "cosine"
    c.optim.end_lr_ratio = 0.1
    trainer = Trainer(c, model)
    first = make_batch(0)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(seed), first))["params"]
    if calibrated:
        params = model.calibrate(params, [make_batch(10_000 + i) for i in range(4)])
    state = trainer.init_state(first, params=params)
    losses, t0 = [], time.time()
    for step in range(steps):
        state, m = trainer.train_step(state, trainer.shard(first if step == 0 else
                                                           make_batch(step)))
        losses.append(m["loss/diffusion"])
    losses = [float(x) for x in jax.device_get(losses)]
    return jax.device_get(state["params"]), losses, time.time() - t0


def generate(model: XVilaLM, params: dict, batches: list[dict], steps: int,
             guidance: float | None, i2i: bool) -> np.ndarray:
    out = [np.asarray(model.generate(params, b, jax.random.key(100 + i), steps=steps,
                                     guidance_scale=guidance, image_to_image=i2i))
           for i, b in enumerate(batches)]
    return image_to_unit(np.concatenate(out))[..., 0]  # [n, 8, 8] in [0, 1]


def head_config(veh: bool) -> XVilaHeadConfig:
    d = recipe.output_head("tiny", tiny.get_config("xvila"))
    d["veh"] = veh
    d["decoder"] = dict(d["decoder"], cond_len=d["gen_tokens"] + (d["highway_tokens"] if veh
                                                                   else 0))
    return XVilaHeadConfig.from_dict(d)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few steps: a smoke run")
    ap.add_argument("--out", default="bench/results/xvila_veh.json")
    ap.add_argument("--steps", type=int, default=0, help="image -> image training steps per "
                    "run (0: mode's)")
    ap.add_argument("--t2i_steps", type=int, default=0, help="text -> image training steps "
                    "per run (0: mode's)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ddim", type=int, default=0, help="DDIM steps (0: mode's)")
    ap.add_argument("--guidance", type=float, default=2.0, help="text -> image CFG scale")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak lr of every run (Adam)")
    args = ap.parse_args(argv)
    steps = args.steps or (20 if args.quick else 1500)
    t2i_steps = args.t2i_steps or (20 if args.quick else 2400)
    ddim = args.ddim or (5 if args.quick else 50)
    n_eval = 20 if args.quick else 0  # 0: the whole test split
    config = OmniConfig.from_dict(tiny.get_config("xvila").to_dict())
    pixels, labels = load_images()
    split = split_images(labels)
    train_idx, test_idx = split["train"], split["test"][:n_eval or None]
    clf, clf_acc = classifier(pixels, labels, split)
    print(f"classifier held-out accuracy {clf_acc:.3f} ({len(split['test'])} test images)",
          flush=True)
    results: dict = {"quick": args.quick, "train_steps": steps, "t2i_steps": t2i_steps,
                     "batch": args.batch,
                     "ddim_steps": ddim, "classifier_test_accuracy": clf_acc,
                     "lr": args.lr, "llm": "tiny (width 32, 2 layers, random init)"}
    with tempfile.TemporaryDirectory() as tmp:
        data = Digits(tmp, config)
        gen_id = data.tok.gen_image_id

        # (1) text -> image: decoder alignment (LLM frozen), then with the LLM trained too
        def t2i_batch(step: int) -> dict:
            rng = np.random.default_rng([1, step])
            idx = rng.choice(train_idx, args.batch)
            return data.t2i(labels[idx], rng, idx, step * args.batch)

        align = list(recipe.output_stages()["decoder_align"].trainable)
        want = np.repeat(np.arange(10), max(1, len(test_idx) // 10))
        for key, trainable, calibrated in (
                ("text_to_image", align, True),
                ("text_to_image_uncalibrated", align, False),
                ("text_to_image_llm_trained", ["^llm/", *align], True)):
            model = XVilaLM(config, head_config(True), gen_id)  # VEH rows masked (no image)
            params, losses, secs = train(model, trainable, t2i_batch, t2i_steps, args.batch,
                                         args.lr, seed=0, calibrated=calibrated)
            rng = np.random.default_rng(7)
            batches = [data.t2i(want[i:i + 50], rng, None, 0) for i in range(0, len(want), 50)]
            imgs = generate(model, params, batches, ddim, args.guidance, False)
            pred = clf.predict(imgs.reshape(len(imgs), -1))
            acc = float(np.mean(pred == want))
            r = results[key] = {
                "accuracy": acc, "per_digit": [float(np.mean(pred[want == d] == d))
                                               for d in range(10)],
                "images": len(want), "guidance": args.guidance, "trainable": trainable,
                "calibrated_head_input": calibrated, "train_steps": t2i_steps,
                "loss_first": float(np.mean(losses[:20])),
                "loss_last": float(np.mean(losses[-20:])), "train_seconds": secs}
            print(f"(1) {key}: {acc:.3f} recognised as the requested digit ({len(want)} "
                  f"images, loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}, {secs:.0f} s)",
                  flush=True)

        # (3) video -> next frame: through the LLM (the VEH carries images, not videos):
        # LLM, video adapter, output projection and decoder trained (x2x_textual's set)
        model = XVilaLM(config, head_config(True), gen_id)

        def v2i_batch(step: int) -> dict:
            rng = np.random.default_rng([3, step])
            return data.v2i(rng.integers(10, size=args.batch), rng, train_idx,
                            step * args.batch)[0]

        trainable = ["^llm/", "^video_adapter/", *recipe.OUT_PROJ, *recipe.DECODER]
        params, losses, secs = train(model, trainable, v2i_batch, t2i_steps, args.batch,
                                     args.lr, seed=0)
        rng = np.random.default_rng(9)
        firsts = np.repeat(np.arange(10), max(1, len(test_idx) // 10))
        pairs = [data.v2i(firsts[i:i + 50], rng, test_idx, 0, targets=False)
                 for i in range(0, len(firsts), 50)]
        imgs = generate(model, params, [b for b, _ in pairs], ddim, args.guidance, False)
        want = np.concatenate([w for _, w in pairs])
        pred = clf.predict(imgs.reshape(len(imgs), -1))
        acc = float(np.mean(pred == want))
        results["video_to_next_frame"] = {
            "accuracy": acc, "images": len(want), "guidance": args.guidance,
            "trainable": trainable, "train_steps": t2i_steps, "held_out_frames": True,
            "loss_first": float(np.mean(losses[:20])),
            "loss_last": float(np.mean(losses[-20:])), "train_seconds": secs}
        print(f"(3) video -> next frame: {acc:.3f} recognised as the next digit ({len(want)} "
              f"held-out videos, {secs:.0f} s)", flush=True)

        # (2) image -> image with and without the VEH, the same budget
        base = ["^llm/", "^image_adapter/", *recipe.OUT_PROJ, *recipe.DECODER]
        for veh in (False, True):
            model = XVilaLM(config, head_config(veh), gen_id)

            def i2i_batch(step: int) -> dict:
                rng = np.random.default_rng([2, step])
                return data.i2i(rng.choice(train_idx, args.batch), step * args.batch)

            trainable = base + (recipe.VEH if veh else [])
            params, losses, secs = train(model, trainable, i2i_batch, steps, args.batch,
                                         args.lr, seed=0)
            batches = [data.i2i(test_idx[i:i + 60], 0, targets=False)
                       for i in range(0, len(test_idx), 60)]
            imgs = generate(model, params, batches, ddim, None, True)
            ref = pixels[test_idx] / 255.0
            p, s = psnr(imgs, ref), ssim(imgs, ref)
            same = float(np.mean(clf.predict(imgs.reshape(len(imgs), -1)) == labels[test_idx]))
            key = "veh" if veh else "no_veh"
            results[f"image_to_image_{key}"] = {
                "psnr_db": float(p.mean()), "psnr_std": float(p.std()),
                "ssim": float(s.mean()), "ssim_std": float(s.std()),
                "same_digit_accuracy": same, "images": len(test_idx),
                "trainable": trainable, "loss_first": float(np.mean(losses[:20])),
                "loss_last": float(np.mean(losses[-20:])), "train_seconds": secs}
            print(f"(2) image -> image {key:>6}: PSNR {p.mean():.2f} dB, SSIM {s.mean():.3f}, "
                  f"same digit {same:.3f} ({len(test_idx)} held-out images, {secs:.0f} s)",
                  flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
