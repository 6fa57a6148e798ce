"""check_logits CLI on SigLIP and Whisper checkpoints (passes, and fails on a bad import)."""

import os

import torch
from transformers import SiglipVisionConfig, SiglipVisionModel, WhisperConfig, WhisperModel

from omni_jax.cli import check_logits

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _diff(out: str) -> float:
    return float(out.split("max_abs_diff=")[1].split()[0])


def test_siglip_and_whisper_pass_and_a_broken_import_fails(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8)).save_pretrained(tmp_path / "siglip")
    WhisperModel(WhisperConfig(
        num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
        max_source_positions=40, max_target_positions=32, vocab_size=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )).save_pretrained(tmp_path / "whisper")
    for name, kind in (("siglip", "siglip_vision"), ("whisper", "whisper_encoder")):
        assert check_logits.main(["--hf", str(tmp_path / name)]) == 0, name
        out = capsys.readouterr().out
        assert f"kind={kind}" in out and "OK" in out and _diff(out) <= 1e-4

    real = check_logits.import_hf

    def broken(path):  # e.g. a converter that forgot a transpose somewhere: perturb one weight
        kind, config, params, hf = real(path)
        params["params"]["post_norm"]["scale"] = params["params"]["post_norm"]["scale"] * 1.01
        return kind, config, params, hf

    monkeypatch.setattr(check_logits, "import_hf", broken)
    assert check_logits.main(["--hf", str(tmp_path / "siglip")]) == 1
    assert "FAIL" in capsys.readouterr().out
