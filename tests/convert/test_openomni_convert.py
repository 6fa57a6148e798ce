"""OpenOmni speech-generator checkpoints: .bin / safetensors import -> export round trip, CTC loss
of the imported generator vs the torch reference, bad files, shards / bf16, the CLI."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "speech"))  # torch_ref
from torch_ref import TorchSpeechGenerator  # noqa: E402

from omni_jax.cli import convert  # noqa: E402
from omni_jax.convert import openomni as oo  # noqa: E402
from omni_jax.convert.qwen2 import config_to_hf  # noqa: E402
from omni_jax.speech.config import speech_preset  # noqa: E402
from omni_jax.speech.generator import SpeechGenerator  # noqa: E402
from omni_jax.train.speech_losses import ctc_loss, ctc_nll  # noqa: E402

H = 24  # LLM hidden width of the tiny configs
# measured over 4 seeds (fp32): |loss diff| 0 - 4.8e-7 (<= 1 ulp of ~4.3); per-item CTC nll
# (~200 each) relative diff <= 2.6e-7 (1-2 ulp)
LOSS_TOL, NLL_RTOL = 2e-6, 1e-6


def tiny(mode="ctc", tied=True, scan=False, llm_hidden=H):
    cfg = speech_preset("tiny", llm_hidden, mode)
    return cfg.replace(decoder=cfg.decoder.replace(tie_word_embeddings=tied, scan_layers=scan))


def reference(cfg, seed=0):
    """A torch generator whose biases / norms are not at their init (mapping bugs show)."""
    torch.manual_seed(seed)
    model = TorchSpeechGenerator(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def state_dict(model, prefix="speech_generator."):
    return {prefix + k: v.clone() for k, v in model.state_dict().items()}


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(torch.as_tensor(np.asarray(got[k])), want[k]), k


@pytest.mark.parametrize("mode,tied,scan", [("ctc", True, False), ("ctc", False, True),
                                            ("ar", True, False)])
def test_round_trip_bin_and_safetensors(tmp_path, mode, tied, scan):
    cfg = tiny(mode, tied, scan)
    sd = state_dict(reference(cfg, seed=1))
    torch.save(sd, tmp_path / "gen.bin")
    full = {"model.speech_generator." + k[len("speech_generator."):]: v for k, v in sd.items()}
    full["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)  # the main LLM's keys
    save_torch(full, tmp_path / "full.safetensors")
    p_bin = oo.import_openomni(str(tmp_path / "gen.bin"), cfg)
    tensors = oo.read_state_dict(str(tmp_path / "full.safetensors"))
    sel, prefix, left = oo.select_generator(tensors)
    assert (prefix, left) == ("model.speech_generator.", 1)
    p_st = oo.params_from_openomni(cfg, tensors)
    flat_bin, flat_st = oo.flatten(p_bin["params"]), oo.flatten(p_st["params"])
    assert sorted(flat_bin) == sorted(flat_st)
    assert all(np.array_equal(flat_bin[k], flat_st[k]) for k in flat_bin)
    assert ("llm/lm_head/kernel" in flat_bin) == (not tied)
    oo.export_openomni(cfg, p_bin, str(tmp_path / "out.safetensors"))
    oo.export_openomni(cfg, p_st, str(tmp_path / "out.bin"))
    assert_same(load_file(tmp_path / "out.safetensors"), sd)
    assert_same(torch.load(tmp_path / "out.bin", weights_only=True), sd)
    assert oo.implied_config(sel)["decoder.tie_word_embeddings"] == tied


def ctc_batch(cfg, seed=0):
    """3 items: plain (72 frames, 40 units), stretched (36 -> 45), tight (60 frames = 60 units);
    units have no adjacent repeats, so every item is feasible."""
    rng = np.random.default_rng(seed)
    s_lens, u_lens, n_rows = [6, 3, 5], [40, 45, 60], [7, 3, 9]
    b, r, s, u = 3, 10, 6, 60
    row_mask = np.zeros((b, r), bool)
    for i, n in enumerate(n_rows):
        row_mask[i, np.sort(rng.choice(r, n, replace=False))] = True
    units = np.zeros((b, u), np.int32)
    for i in range(b):
        for t in range(1, u):  # never equal to the previous unit
            units[i, t] = (units[i, t - 1] + rng.integers(1, cfg.unit_vocab)) % cfg.unit_vocab
    return {"hidden": rng.standard_normal((b, r, H)).astype(np.float32), "row_mask": row_mask,
            "text_ids": rng.integers(0, cfg.decoder.vocab_size, (b, s)).astype(np.int32),
            "text_mask": np.arange(s)[None] < np.asarray(s_lens)[:, None], "units": units,
            "unit_mask": np.arange(u)[None] < np.asarray(u_lens)[:, None]}


def test_imported_generator_ctc_loss_matches_torch(tmp_path):
    cfg = tiny("ctc")
    model = reference(cfg, seed=2)
    torch.save(state_dict(model), tmp_path / "gen.bin")
    params = oo.import_openomni(str(tmp_path / "gen.bin"), cfg)
    batch = ctc_batch(cfg)
    names = ("hidden", "row_mask", "text_ids", "text_mask", "units", "unit_mask")
    out = jax.jit(SpeechGenerator(cfg).apply)(params, *(jnp.asarray(batch[k]) for k in names))
    loss, metrics = ctc_loss(out, {"speech_units": jnp.asarray(batch["units"]),
                                   "speech_unit_mask": jnp.asarray(batch["unit_mask"])})
    with torch.no_grad():
        ref = model(*(torch.tensor(batch[k]) for k in names))
    frames, u_lens = ref["speech_frames"], torch.tensor(batch["unit_mask"].sum(1))
    assert frames.tolist() == [72, 45, 60]
    lp = ref["speech_log_probs"].transpose(0, 1)  # [T, B, V + 1]
    kw = dict(blank=cfg.unit_vocab, zero_infinity=True)
    per = F.ctc_loss(lp, torch.tensor(batch["units"]), frames, u_lens, reduction="none", **kw)
    want = F.ctc_loss(lp, torch.tensor(batch["units"]), frames, u_lens, reduction="sum",
                      **kw) / u_lens.sum()
    nll, _ = ctc_nll(out["speech_log_probs"], out["speech_frame_mask"],
                     jnp.asarray(batch["units"]), jnp.asarray(batch["unit_mask"]))
    rel = np.abs(np.asarray(nll) - per.numpy()) / per.numpy()
    assert float(metrics["infeasible"]) == 0 and (per > 0).all()
    diff = abs(float(loss) - float(want))
    print(f"CTC loss jax {float(loss):.7f} vs torch {float(want):.7f}: |diff| {diff:.2e}; "
          f"per-item nll relative diff {rel.max():.2e}")
    assert float(want) > 1.0 and diff < LOSS_TOL and rel.max() < NLL_RTOL


def test_bad_files_in_one_error(tmp_path):
    cfg = tiny("ctc")
    sd = {k: v.numpy() for k, v in state_dict(reference(cfg, seed=3)).items()}
    bad = dict(sd)
    del bad["speech_generator.fusion.layers.1.0.to_kv.weight"]
    bad["speech_generator.fusion.extra.weight"] = np.zeros(3, np.float32)
    bad["speech_generator.llm_decoder.bias"] = np.zeros(7, np.float32)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError) as e:
        oo.import_openomni(str(tmp_path / "bad.safetensors"), cfg)
    msg = str(e.value)
    assert "prefix 'speech_generator.'" in msg
    assert "missing keys ['fusion.layers.1.0.to_kv.weight']" in msg
    assert "unexpected keys ['fusion.extra.weight']" in msg
    assert "llm_decoder.bias: expected (41,), got (7,)" in msg
    with pytest.raises(ValueError, match="nowhere.bin' does not exist"):
        oo.import_openomni(str(tmp_path / "nowhere.bin"), cfg)
    wide = state_dict(reference(tiny("ctc", llm_hidden=48), seed=4))
    torch.save(wide, tmp_path / "wide.bin")
    with pytest.raises(ValueError, match=r"implies another config \(llm_hidden: file 48, "
                                         r"config 24\)") as e:
        oo.import_openomni(str(tmp_path / "wide.bin"), cfg)
    assert "input_proj.gate.fc.weight: expected (4, 24), got (4, 48)" in str(e.value)
    untied = dict(sd, **{"speech_generator." + oo.LM_HEAD: sd["speech_generator." + oo.EMBED] + 1})
    with pytest.raises(ValueError, match="tie_word_embeddings: file False"):
        oo.params_from_openomni(cfg, untied)
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read torch checkpoint"):
        oo.read_state_dict(str(tmp_path / "junk.bin"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read safetensors file"):
        oo.read_state_dict(str(tmp_path / "junk.safetensors"))
    with pytest.raises(ValueError, match="no key starts with prefix 'x.'"):
        oo.params_from_openomni(cfg, sd, prefix="x.")
    seg = speech_preset("tiny", H, "ctc", segment_positions=True)  # no OpenOmni counterpart
    with pytest.raises(ValueError, match="segment_positions=True adds a table"):
        oo.params_from_openomni(seg, sd)
    with pytest.raises(ValueError, match="segment_positions=True adds a table"):
        oo.params_to_openomni(seg, {})


def test_torch_is_optional(tmp_path, monkeypatch):
    torch.save({"a": torch.zeros(2)}, tmp_path / "a.bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    with pytest.raises(ValueError, match="needs PyTorch"):
        oo.read_state_dict(str(tmp_path / "a.bin"))


def test_shards_bf16_and_inferred_config(tmp_path):
    cfg = tiny("ctc")
    sd = state_dict(reference(cfg, seed=5))
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"a.safetensors": keys[:half], "b.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_torch({k: sd[k].to(torch.bfloat16) for k in ks}, tmp_path / name)
    bf16 = oo.read_state_dict(str(tmp_path))  # no index: every shard in the directory
    for k in keys:
        assert np.array_equal(bf16[k], sd[k].to(torch.bfloat16).float().numpy()), k
    index = {"weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "b.safetensors").unlink()
    with pytest.raises(ValueError, match="shards named in model.safetensors.index.json are "
                                         "missing"):
        oo.read_state_dict(str(tmp_path))
    rel, _, _ = oo.select_generator(sd)
    assert oo.config_from_openomni(rel, config_to_hf(cfg.decoder), fusion_heads=4) == cfg
    shapes_only = oo.config_from_openomni(rel, fusion_heads=4, decoder_head_dim=8)
    assert shapes_only.decoder.num_heads == 4 and shapes_only.fusion_head_dim == 8
    assert shapes_only.replace(decoder=cfg.decoder) == cfg


def test_cli_import_export(tmp_path, capsys):
    cfg = tiny("ctc")
    sd = state_dict(reference(cfg, seed=6))
    torch.save(sd, tmp_path / "gen.pt")
    (tmp_path / "llm.json").write_text(json.dumps(config_to_hf(cfg.decoder)))
    assert convert.main(["import-openomni", str(tmp_path / "gen.pt"), str(tmp_path / "native"),
                         "--llm-config", str(tmp_path / "llm.json"), "--fusion-heads", "4"]) == 0
    assert "prefix 'speech_generator.'" in capsys.readouterr().out
    assert oo.load_native_openomni(str(tmp_path / "native"))[0] == cfg
    assert convert.main(["export-openomni", str(tmp_path / "native"),
                         str(tmp_path / "out.safetensors")]) == 0
    assert_same(load_file(tmp_path / "out.safetensors"), sd)
    assert convert.main(["import-openomni", str(tmp_path / "none.bin"), str(tmp_path / "x")]) == 2
    assert "none.bin' does not exist" in capsys.readouterr().err
