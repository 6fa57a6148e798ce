"""Ola import: a random tiny checkpoint in Ola's exact layout (config.json with Ola's fields,
sharded safetensors, OpenAI Whisper .pt, unilm BEATs .pt) imports through the CLI and gives the
logits of a torch reference (ola_torch_ref) for an image + speech prompt; view token counts
follow SEEDS.md; unsupported settings and missing tensors raise ValueError."""

import json
import os
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "encoders"))
import ola_torch_ref as ref  # noqa: E402
from beats_torch_ref import BEATsRef  # noqa: E402
from beats_torch_ref import randomize as beats_randomize  # noqa: E402

from omni_jax.adapters.lgap import OlaProjector  # noqa: E402
from omni_jax.cli import convert as cli  # noqa: E402
from omni_jax.convert.ola import config_dict, import_ola, load_ola  # noqa: E402
from omni_jax.encoders.vision import SiglipVisionEncoder  # noqa: E402
from omni_jax.model import AUDIO_WAVE, OmniModel, tokens_per_item  # noqa: E402
from omni_jax.omni_config import OmniConfig  # noqa: E402

TOL, VIEW_TOL = 2e-5, 5e-6  # measured 3.3e-6 (logits), 8.9e-7 (two-view embeddings)
D, VIS, HEADS = 32, 24, 4
LLM = dict(vocab_size=96, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
           rms_norm_eps=1e-6, tie_word_embeddings=False, attn_implementation="eager")
VIT = dict(dim=VIS, layers=2, heads=HEADS, hidden=40, patch=16, grid=128)  # Oryx: 128^2 grid
WHISPER = dict(mels=128, width=16, layers=2, heads=2, ctx=50)  # 1 s chunks: 100 mel frames
BEATS = dict(input_patch_size=16, embed_dim=16, encoder_embed_dim=16, encoder_layers=1,
             encoder_ffn_embed_dim=32, encoder_attention_heads=2, conv_pos=8, conv_pos_groups=4,
             deep_norm=True, relative_position_embedding=True, num_buckets=16, max_distance=20,
             gru_rel_pos=True, dropout=0.0, attention_dropout=0.0)
ENC, K, SPEECH_HIDDEN = 16 + 16, 10, 24  # [whisper | beats] channels, ds_rate, linear1 width
IMAGE, CHUNKS = (64, 96), 2  # one view: 2 x 3 pooled grid; 2 chunks of 1 s
OLA_FIELDS = dict(model_type="ola_qwen", architectures=["OlaQwenForCausalLM"],
                  mm_projector_type="ola_mlp", mm_hidden_size=VIS, mm_vision_select_layer=-1,
                  mm_vision_tower="oryx_vit:SiglipViTSO400M", speech_encoder_type="dual",
                  speech_encoder_hidden_size=ENC, speech_encoder_ds_rate=K,
                  speech_projector_type="linear", speech_encoder="large-v3.pt",
                  music_encoder="BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt")


def write_checkpoint(d):
    torch.manual_seed(0)
    lm = ref.build_ola(LLM, VIT, VIS, ENC, K, SPEECH_HIDDEN)
    lm.model.add_module("speech_encoder", torch.nn.Linear(4, 4))  # overwritten by Ola: ignored
    ref.randomize(lm, seed=1)
    lm.save_pretrained(str(d / "ola"), max_shard_size="100KB")
    cfg = json.loads((d / "ola" / "config.json").read_text())
    (d / "ola" / "config.json").write_text(json.dumps({**cfg, **OLA_FIELDS}))
    whisper = ref.whisper_encoder(**WHISPER, seed=2)
    torch.save(ref.whisper_pt(whisper), d / "large-v3.pt")
    beats = beats_randomize(BEATsRef(BEATS), seed=3)
    torch.save({"cfg": BEATS, "model": beats.state_dict()}, d / "BEATs.pt")
    return lm, whisper, beats


@pytest.fixture(scope="module")
def ola(tmp_path_factory):
    d = tmp_path_factory.mktemp("ola")
    lm, whisper, beats = write_checkpoint(d)
    shards = [f for f in os.listdir(d / "ola") if f.endswith(".safetensors")]
    assert len(shards) > 2 and (d / "ola" / "model.safetensors.index.json").exists()
    rc = cli.main(["import-ola", str(d / "ola"), "--whisper", str(d / "large-v3.pt"),
                   "--beats", str(d / "BEATs.pt"), str(d / "native"), "--image-size", "64", "96",
                   "--audio-chunks", str(CHUNKS), "--vision-heads", str(HEADS)])
    assert rc == 0
    config, params = load_ola(str(d / "native"))
    return d, lm, whisper, beats, config, params


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(-1, 1, size=(1, 3, *IMAGE)).astype(np.float32)
    mel = rng.normal(size=(CHUNKS, WHISPER["mels"], 2 * WHISPER["ctx"])).astype(np.float32)
    wave = (rng.normal(size=(CHUNKS, 16000)) * 0.1).astype(np.float32)
    return pixels, mel, wave


def test_logits_match_reference(ola):
    _, lm, whisper, beats, config, params = ola
    pixels, mel, wave = inputs()
    n_img = 2 + (IMAGE[0] // 32) * (IMAGE[1] // 32 + 1)  # one view: [begin] rows+NL [end]
    n_sp = CHUNKS * (2 * WHISPER["ctx"] // 2 // K + 1) + 2  # rows per chunk + NL, begin/end
    assert (tokens_per_item(config, "image"), tokens_per_item(config, "audio")) == (n_img, n_sp)
    s = 5 + n_img + 4 + n_sp + 3
    ids = np.random.default_rng(1).integers(0, LLM["vocab_size"], (1, s)).astype(np.int32)
    img_at, sp_at = 5, 5 + n_img + 4
    speech = ref.dual_audio(whisper, beats, torch.from_numpy(mel), torch.from_numpy(wave))
    want, n_img_ref, n_sp_ref = ref.ola_logits(lm, torch.from_numpy(ids).long(), img_at,
                                               torch.from_numpy(pixels), sp_at, speech)
    assert (n_img_ref, n_sp_ref) == (n_img, n_sp)
    mod = np.zeros_like(ids)
    mod[0, img_at:img_at + n_img] = 1
    mod[0, sp_at:sp_at + n_sp] = 3
    batch = {"input_ids": jnp.asarray(ids), "modality": jnp.asarray(mod),
             "image": jnp.asarray(pixels.transpose(0, 2, 3, 1)), "audio": jnp.asarray(mel[None]),
             AUDIO_WAVE: jnp.asarray(wave[None])}
    got = jax.jit(OmniModel(config).apply)(params, batch)["logits"]
    err = float(np.max(np.abs(np.asarray(got) - want.numpy())))
    print(f"ola logits max |err| = {err:.2e}")
    assert err < TOL, err


def _views(config, params, low, high, cfg=None):
    vis = cfg or config.image.encoder_config
    enc = lambda x: SiglipVisionEncoder(vis).apply(  # noqa: E731
        {"params": params["params"]["image_encoder"]}, jnp.asarray(x.transpose(0, 2, 3, 1)))
    proj = OlaProjector(config.image.adapter_config)
    g1, g2 = vis.grid(*low.shape[2:]), vis.grid(*high.shape[2:])
    out = proj.apply({"params": params["params"]["image_adapter"]}, enc(low), g1, enc(high), g2)
    return np.asarray(out[0]), proj.num_tokens(*g1, g2)


def test_two_views_match_reference_and_seeds_count(ola):
    """OmniModel fixes one image size per tower, so the low-res + high-res path is checked on
    the imported encoder + adapter params directly (the model wiring is the lead's)."""
    _, lm, _, _, config, params = ola
    rng = np.random.default_rng(2)
    low = rng.uniform(-1, 1, (1, 3, 32, 64)).astype(np.float32)
    high = rng.uniform(-1, 1, (1, 3, 96, 128)).astype(np.float32)
    want = ref.two_view(lm, torch.from_numpy(low), torch.from_numpy(high)).numpy()
    got, n = _views(config, params, low, high)
    (h, w), (hh, ww) = low.shape[2:], high.shape[2:]
    assert n == got.shape[0] == want.shape[0] == 3 + (h // 32) * (w // 32 + 1) + \
        (hh // 32) * (ww // 32 + 1) == 21
    err = float(np.max(np.abs(got - want)))
    print(f"ola two-view embeddings max |err| = {err:.2e}")
    assert err < VIEW_TOL, err
    # the check sees the position-grid resize: bicubic instead of bilinear is far off
    bicubic = config.image.encoder_config.replace(pos_interp="bicubic")
    assert np.max(np.abs(_views(config, params, low, high, bicubic)[0] - want)) > 1e-3


def test_config_at_checkpoint_sizes_and_roundtrip(ola):
    *_, config, params = ola
    v = config.image.encoder_config
    assert (v.native_grid, v.patch_size, v.hidden_size, v.num_layers, v.num_heads) == \
        (128, 16, VIS, 2, HEADS)
    assert (v.pos_interp, v.hidden_act, v.use_post_layernorm, v.layer_norm_eps) == \
        ("bilinear", "gelu", False, 1e-6)
    a = config.audio
    assert (a.encoder, a.num_chunks, a.encoder_config.chunk_seconds) == ("ola_audio", CHUNKS, 1.0)
    assert (a.adapter_config.stack, a.adapter_config.remainder, a.adapter_config.hidden_dim) == \
        (K, "drop", SPEECH_HIDDEN)
    assert config.image.adapter == "ola_lgap" and config.llm.hidden_size == D
    assert OmniConfig.from_dict(config_dict(config)) == config
    pos = params["params"]["image_encoder"]["pos_embed"]
    assert pos.shape == (128 * 128, VIS)


def test_video_tower_shares_the_projector(ola):
    d, *_ = ola
    config, params, _ = import_ola(str(d / "ola"), str(d / "large-v3.pt"), str(d / "BEATs.pt"),
                                   image_size=IMAGE, num_chunks=1, video_frames=2,
                                   video_size=(64, 64), vision_heads=HEADS, scan_layers=True)
    assert config.video.encoder == "shared:image" and config.video.num_frames == 2
    assert config.llm.scan_layers  # stacked layers: the tree check in import_ola passed
    p = nn.meta.unbox(params)["params"]
    np.testing.assert_array_equal(p["video_adapter"]["proj1"]["kernel"],
                                  p["image_adapter"]["proj1"]["kernel"])


def _copy(d, name, **fields):
    out = d / name
    shutil.copytree(d / "ola", out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, **fields}))
    return out


@pytest.mark.parametrize("fields, match", [
    (dict(mm_projector_type="mlp2x_gelu"), r"mm_projector_type='mlp2x_gelu' is not supported"),
    (dict(speech_encoder_type="whisper"), r"speech_encoder_type='whisper' is not supported"),
    (dict(model_type="qwen2"), r"model_type='qwen2' is not supported; expected 'ola_qwen'"),
    (dict(speech_encoder_ds_rate=0), r"speech_encoder_ds_rate must be a positive int"),
])
def test_unsupported_config_raises(ola, fields, match):
    d = ola[0]
    src = _copy(d, f"bad_{next(iter(fields))}", **fields)
    with pytest.raises(ValueError, match=match):
        import_ola(str(src), str(d / "large-v3.pt"), str(d / "BEATs.pt"))


def test_whisper_of_another_size_raises(ola):
    d = ola[0]
    other = ref.whisper_encoder(**{**WHISPER, "width": 8}, seed=4)
    torch.save(ref.whisper_pt(other), d / "small.pt")
    with pytest.raises(ValueError, match=r"n_audio_state=8 .* speech_encoder_hidden_size=32 "
                                         r"implies a Whisper of width 16"):
        import_ola(str(d / "ola"), str(d / "small.pt"), str(d / "BEATs.pt"), image_size=IMAGE,
                   vision_heads=HEADS)


@pytest.mark.parametrize("drop, match", [
    ("model.vision_tower.vision_tower.blocks.1.attn.qkv.weight",
     r"vision tower .*missing keys \['blocks.1.attn.qkv.weight'\]"),
    ("model.mm_projector.image_sep", r"ola_mlp projector .*missing keys \['image_sep'\]"),
    ("model.speech_projector.linear2.bias", r"speech projector .*missing keys \['linear2.bias'\]"),
])
def test_missing_tower_key_raises(ola, drop, match):
    d, lm = ola[0], ola[1]
    out = d / f"missing_{drop.split('.')[1]}"
    out.mkdir()
    (out / "config.json").write_text((d / "ola" / "config.json").read_text())
    sd = {k: v.numpy() for k, v in lm.state_dict().items() if k != drop}
    save_file(sd, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=match):
        import_ola(str(out), str(d / "large-v3.pt"), str(d / "BEATs.pt"), image_size=IMAGE,
                   vision_heads=HEADS)


def test_cli_reports_errors(ola, capsys):
    d = ola[0]
    rc = cli.main(["import-ola", str(d / "ola"), "--whisper", str(d / "nope.pt"), "--beats",
                   str(d / "BEATs.pt"), str(d / "x"), "--vision-heads", str(HEADS)])
    assert rc == 2 and "nope.pt" in capsys.readouterr().err


def test_ola_prompt_layout():
    """Ola's inference prompt (SEEDS): `<image>\\n{q}`, `<speech>\\n{q}`, and an image with a
    spoken question as `<image>\\nUser's question in speech: <speech>\\n`, system turn first."""
    from omni_jax.infer.omni import ola_user_record

    rec = ola_user_record(images=["a.png"], speech=["q.wav"])
    sys_turn, user = rec["messages"]
    assert sys_turn == {"role": "system", "content": "You are a helpful assistant."}
    assert [p["type"] for p in user["content"]] == ["image", "text", "audio", "text"]
    assert user["content"][1]["text"] == "\nUser's question in speech: "
    assert rec["images"] == ["a.png"] and rec["audios"] == ["q.wav"]
    rec = ola_user_record("What is it?", images=["a.png"])
    assert rec["messages"][1]["content"] == [{"type": "image"},
                                             {"type": "text", "text": "\nWhat is it?"}]
    rec = ola_user_record("Answer.", speech=["q.wav"])
    assert [p["type"] for p in rec["messages"][1]["content"]] == ["audio", "text"]
    with pytest.raises(ValueError, match="the question is the speech"):
        ola_user_record("q", images=["a.png"], speech=["q.wav"])
