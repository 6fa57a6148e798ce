"""8 emulated CPU devices: the omni model (SigLIP + Whisper towers + adapters + Qwen2 LLM + the
speech generator) trained on (data=2, fsdp=2, tensor=2) vs 1 device, with CE + CTC.

Run as a subprocess (XLA_FLAGS must be set before jax is imported); prints one JSON line.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from helpers import assert_params_close, parity_config  # noqa: E402

from omni_jax.configs.models import tiny  # noqa: E402
from omni_jax.model import tokens_per_item  # noqa: E402
from omni_jax.omni_config import OmniConfig  # noqa: E402
from omni_jax.parallel.mesh import make_mesh  # noqa: E402
from omni_jax.speech.config import speech_preset  # noqa: E402
from omni_jax.train import Trainer  # noqa: E402
from omni_jax.train.omni_model import OmniLM  # noqa: E402

B, L, S, U = 8, 96, 6, 40


def batches(cfg: OmniConfig, n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    ti, ta = tokens_per_item(cfg, "image"), tokens_per_item(cfg, "audio")
    out = []
    for _ in range(n):
        ids = rng.integers(10, cfg.llm.vocab_size, (B, L)).astype(np.int32)
        modality = np.zeros((B, L), np.int32)
        modality[:, 1:1 + ti] = 1
        modality[:, 2 + ti:2 + ti + ta] = 3
        rows = np.zeros((B, L), np.int32)
        rows[:, -12:] = 1
        text_len = rng.integers(2, S + 1, B)
        unit_len = rng.integers(5, U + 1, B)
        out.append({
            "input_ids": ids, "modality": modality,
            "targets": np.roll(ids, -1, axis=1), "loss_mask": (modality == 0).astype(np.int32),
            "image": rng.normal(size=(B, 32, 32, 3)).astype(np.float32),
            "audio": rng.normal(size=(B, 80, 100)).astype(np.float32),
            "speech_rows": rows,
            "speech_text_ids": rng.integers(10, 500, (B, S)).astype(np.int32),
            "speech_text_mask": (np.arange(S)[None] < text_len[:, None]).astype(np.int32),
            "speech_units": rng.integers(0, 40, (B, U)).astype(np.int32),
            "speech_unit_mask": (np.arange(U)[None] < unit_len[:, None]).astype(np.int32)})
    return out


def main():
    assert jax.device_count() == 8, jax.devices()
    d = tiny.get_config("capybara").to_dict()
    d.pop("video")
    d["speech"] = speech_preset("tiny", 32, text_vocab=512).to_dict()
    cfg = OmniConfig.from_dict(d)
    model = OmniLM(cfg)
    data = batches(cfg, 2)

    def config(mesh):
        c = parity_config(batch_size=B, mesh=mesh)
        c.stage.losses = {"ce": 1.0, "ctc": 1.0}
        return c

    ref = Trainer(config({"data": 1}), model, mesh=make_mesh({}, jax.devices()[:1]))
    state = ref.init_state(data[0])
    params0 = jax.device_get(state["params"])
    ref_losses = []
    for b in data:
        state, m = ref.train_step(state, ref.shard(b))
        ref_losses.append([float(m["loss/ce"]), float(m["loss/ctc"])])
    ref_params = jax.device_get(state["params"])

    tr = Trainer(config({"data": 2, "fsdp": 2, "tensor": 2}), model)
    state = tr.init_state(data[0], params=params0)
    losses = []
    for b in data:
        state, m = tr.train_step(state, tr.shard(b))
        losses.append([float(m["loss/ce"]), float(m["loss/ctc"])])
    assert_params_close(state["params"], ref_params, atol=1e-5)  # raises on mismatch
    p = state["params"]
    picks = {"image_encoder": p["image_encoder"]["layers_0"]["mlp"]["fc1"]["kernel"],
             "audio_encoder": p["audio_encoder"]["layers_0"]["mlp"]["fc1"]["kernel"],
             "speech": p["speech"]["input_proj"]["fc1_kernel"],
             "llm": p["llm"]["layers_0"]["mlp"]["gate"]["kernel"]}
    print(json.dumps({
        "losses": losses, "ref_losses": ref_losses,
        "specs": {k: str(v.sharding.spec) for k, v in picks.items()},
        "shards": {k: [list(v.shape), list(v.addressable_shards[0].data.shape)]
                   for k, v in picks.items()}}))


if __name__ == "__main__":
    main()
