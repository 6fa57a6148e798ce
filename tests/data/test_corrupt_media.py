"""One bad file never kills a run: records with an empty image, a truncated WAV or a non-audio
file are skipped with a warning and counted; the stream resumes exactly; strict mode raises;
too many bad records stop the stage with a clear message."""

import json

import numpy as np
import pytest

from omni_jax.data.features.config import AudioConfig
from omni_jax.data.fixtures import make_fixtures, train_fixture_tokenizer
from omni_jax.data.omni import OmniEncoder, media_spec
from omni_jax.data.pipeline import make_dataset
from omni_jax.data.sources import CorruptMediaError
from omni_jax.data.template import ChatTemplate
from omni_jax.data.tokenizer import TokenizerConfig, load_tokenizer
from omni_jax.omni_config import OmniConfig

D = 32
CONFIG = {
    "llm": dict(vocab_size=512, hidden_size=D, intermediate_size=48, num_layers=1, num_heads=4,
                num_kv_heads=2),
    "image": dict(encoder="siglip", adapter="mlp", adapter_config=dict(out_dim=D),
                  encoder_config=dict(hidden_size=16, intermediate_size=32, num_layers=1,
                                      num_heads=2, image_size=32, patch_size=8),
                  image_size=[32, 32]),
    "audio": dict(encoder="whisper", adapter="speech", num_frames=100,
                  encoder_config=dict(num_mel_bins=80, d_model=16, encoder_layers=1,
                                      encoder_attention_heads=2, encoder_ffn_dim=32,
                                      max_source_positions=50),
                  adapter_config=dict(in_dim=16, out_dim=D, hidden_dim=32, stack=5)),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    fx = root / "fx"
    manifests = make_fixtures(fx, num_images=6, num_audio=4, num_videos=1, num_text=2,
                              use_espeak=False)
    spm = train_fixture_tokenizer(manifests, 400, root / "spm")
    good = [json.loads(line) for name in ("image_qa", "speech_asr")
            for line in open(manifests[name])]
    (fx / "images" / "empty.png").write_bytes(b"")
    wav = (fx / good[-1]["audios"][0]).read_bytes()
    (fx / "audio" / "truncated.wav").write_bytes(wav[:30])  # a RIFF header cut short
    (fx / "audio" / "notes.wav").write_text("these are not audio samples\n" * 20)
    bad = [dict(good[0], id="bad_img", images=["images/empty.png"]),
           dict(good[-1], id="bad_trunc", audios=["audio/truncated.wav"]),
           dict(good[-1], id="bad_text", audios=["audio/notes.wav"])]
    records = good[:3] + bad[:1] + good[3:6] + bad[1:] + good[6:]
    path = fx / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = OmniConfig.from_dict(CONFIG)
    tok = load_tokenizer(TokenizerConfig(path=spm))
    enc = OmniEncoder(cfg, ChatTemplate(tok), audio=AudioConfig(chunk_seconds=1))
    media = media_spec(cfg, {"image": 4, "audio": 4}, AudioConfig(chunk_seconds=1))
    return enc, str(path), media, len(good)


def data(path, media, **kw):
    return {"sources": {"mixed": {"path": path}}, "batch_size": 2, "seq_buckets": (256,),
            "media": media, "num_epochs": 1, "read_threads": 0, **kw}


def test_bad_records_are_skipped_counted_and_the_rest_batched(setup):
    enc, path, media, n_good = setup
    it = iter(make_dataset(data(path, media), enc, process_index=0, process_count=1))
    batches = list(it)
    m = it.metrics()
    assert m["data/skipped_corrupt_media"] == 3
    assert m["data/examples"] == n_good
    assert sum(int((b["segment_ids"].sum(1) > 0).sum()) for b in batches) == n_good


def test_resume_after_skips_is_exact(setup):
    enc, path, media, _ = setup
    ds = make_dataset(data(path, media, num_epochs=None), enc, process_index=0, process_count=1)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    rest = [next(it) for _ in range(5)]
    it2 = iter(ds)
    it2.set_state(state)
    for a in rest:
        b = next(it2)
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert it2.metrics()["data/skipped_corrupt_media"] == it.metrics()[
        "data/skipped_corrupt_media"] > 0


def test_strict_mode_raises_and_too_many_bad_records_stop(setup):
    enc, path, media, _ = setup
    strict = iter(make_dataset(data(path, media, on_corrupt_media="raise"), enc,
                               process_index=0, process_count=1))
    with pytest.raises(CorruptMediaError, match=r"record 'bad_\w+': (image|audio) item unreadable"):
        list(strict)
    picky = iter(make_dataset(data(path, media, skip_grace=1, max_skipped_fraction=0.1), enc,
                              process_index=0, process_count=1))
    with pytest.raises(ValueError, match=r"2 of \d+ records had undecodable media \(more"):
        list(picky)
