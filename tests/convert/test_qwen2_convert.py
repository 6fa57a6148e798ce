"""Qwen2 checkpoints: HF -> omni_jax -> HF round trip, the convert/check CLIs, bad checkpoints."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from omni_jax.cli import check_logits, convert
from omni_jax.convert.qwen2 import export_qwen2, import_qwen2

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _save_hf(path, tied=False, seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                      max_position_embeddings=64, eos_token_id=3, bos_token_id=2)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("scan", [False, True])
def test_round_trip_identical_tensors(tmp_path, tied, scan):
    ref = _save_hf(tmp_path / "hf", tied=tied)
    config, params = import_qwen2(str(tmp_path / "hf"), scan_layers=scan)
    export_qwen2(config, params, str(tmp_path / "out"))
    back = Qwen2ForCausalLM.from_pretrained(tmp_path / "out")
    a, b = ref.state_dict(), back.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cli_import_export_and_check_logits(tmp_path, capsys):
    ref = _save_hf(tmp_path / "hf", seed=1)
    assert convert.main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "native")]) == 0
    assert convert.main(["export-hf", str(tmp_path / "native"), str(tmp_path / "out")]) == 0
    back = Qwen2ForCausalLM.from_pretrained(tmp_path / "out")
    for k, v in ref.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    assert back.config.eos_token_id == 3  # fields we do not model survive via the stored config
    assert check_logits.main(["--hf", str(tmp_path / "out"), "--seq", "8"]) == 0
    out = capsys.readouterr().out
    diff = float(out.split("max_abs_diff=")[1].split()[0])
    assert diff <= 1e-4 and "OK" in out


def test_check_logits_fails_on_a_wrong_conversion(tmp_path, capsys, monkeypatch):
    _save_hf(tmp_path / "hf", seed=2)
    real = check_logits.import_hf

    def broken_import(path):  # a converter bug: one bias slightly off
        kind, config, params, hf = real(path)
        params["params"]["layers_1"]["attn"]["v"]["bias"][0, 0] += 1e-2
        return kind, config, params, hf

    monkeypatch.setattr(check_logits, "import_hf", broken_import)
    assert check_logits.main(["--hf", str(tmp_path / "hf"), "--seq", "8"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and float(out.split("max_abs_diff=")[1].split()[0]) > 1e-4


def test_bad_checkpoints_list_their_problems(tmp_path):
    _save_hf(tmp_path / "hf", seed=3)
    f = tmp_path / "hf" / "model.safetensors"
    t = load_file(f)
    del t["model.layers.1.mlp.up_proj.weight"]
    t["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
    t["model.norm.weight"] = np.zeros(31, np.float32)
    save_file(t, f)
    with pytest.raises(ValueError) as e:
        import_qwen2(str(tmp_path / "hf"))
    msg = str(e.value)
    assert "missing keys ['model.layers.1.mlp.up_proj.weight']" in msg
    assert "unexpected keys ['model.layers.0.extra.weight']" in msg
    assert "model.norm.weight: expected (32,), got (31,)" in msg
    with pytest.raises(ValueError, match="no config.json"):
        import_qwen2(str(tmp_path))
    f.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read safetensors"):
        import_qwen2(str(tmp_path / "hf"))


def test_sharded_checkpoint_and_unsupported_configs(tmp_path):
    model = _save_hf(tmp_path / "hf", seed=4)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    c1, p1 = import_qwen2(str(tmp_path / "hf"))
    c2, p2 = import_qwen2(str(tmp_path / "sharded"))
    assert c1 == c2
    np.testing.assert_array_equal(p1["params"]["lm_head"]["kernel"],
                                  p2["params"]["lm_head"]["kernel"])
    cfg_file = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["use_sliding_window"] = True
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="sliding-window"):
        import_qwen2(str(tmp_path / "hf"))
    assert convert.main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "x")]) == 2


def test_bf16_checkpoint_exports_in_bf16_sharded_like_save_pretrained(tmp_path):
    """A bf16 checkpoint imports (bf16 tensors read as ml_dtypes.bfloat16), exports in bf16
    unless told otherwise, shards with an index above --max_shard_size, and transformers loads
    identical tensors; --dtype float32 widens it."""
    ref = _save_hf(tmp_path / "f32", seed=5).to(torch.bfloat16)
    ref.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert convert.main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "native")]) == 0
    assert convert.main(["export-hf", str(tmp_path / "native"), str(tmp_path / "out"),
                         "--max_shard_size", "20KB"]) == 0
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).stat().st_size <= 20_000 + 4096 for s in shards)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    back = Qwen2ForCausalLM.from_pretrained(out)
    a, b = ref.state_dict(), back.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        assert b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]), k
    total = sum(v.numel() * 2 for v in a.values())
    assert index["metadata"]["total_size"] == total
    assert convert.main(["export-hf", str(tmp_path / "native"), str(tmp_path / "wide"),
                         "--dtype", "float32"]) == 0
    wide = Qwen2ForCausalLM.from_pretrained(tmp_path / "wide")
    for k, v in wide.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, a[k].float()), k
    assert convert.main(["export-hf", str(tmp_path / "native"), str(tmp_path / "x"),
                         "--max_shard_size", "lots"]) == 2
