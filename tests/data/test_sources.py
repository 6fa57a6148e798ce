"""JSONL manifest source (indexing, media paths, corrupt records), TFDS round trip, fixtures."""

import json
import logging
import os
import pickle
import subprocess
import sys

import pytest

from omni_jax.data import sources
from omni_jax.data.fixtures import make_fixtures

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(sources.__file__))))


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fixtures")
    manifests = make_fixtures(root, seed=3, num_images=4, num_audio=3, num_videos=2, num_text=4)
    return root, manifests


def _write(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _good(i, **extra):
    return json.dumps({"messages": [{"role": "user", "content": f"hi {i}"}], "uid": i, **extra})


def test_jsonl_indexes_lines_and_resolves_media(tmp_path):
    os.makedirs(tmp_path / "img")
    (tmp_path / "img" / "a.png").write_bytes(b"png-a")
    _write(tmp_path / "m1.jsonl", [_good(0, images=["img/a.png"]), "", _good(1)])
    _write(tmp_path / "m2.jsonl", [_good(2, videos=[["img/a.png", str(tmp_path / "img/a.png")]])])
    src = sources.JsonlSource([tmp_path / "m1.jsonl", tmp_path / "m2.jsonl"])
    assert len(src) == 3 and src.num_corrupt == 0
    assert [src[i]["uid"] for i in range(3)] == [0, 1, 2]
    assert src[-1]["uid"] == 2
    abs_png = str(tmp_path / "img" / "a.png")
    assert src[0]["images"] == [abs_png]
    assert src[2]["videos"] == [[abs_png, abs_png]]
    assert sources.read_media(src[0]["images"][0]) == b"png-a"
    inline = sources.JsonlSource(tmp_path / "m1.jsonl", inline_media=True)
    assert inline[0]["images"] == [b"png-a"]
    again = pickle.loads(pickle.dumps(src))  # grain worker processes pickle sources
    assert again[1] == src[1]
    with pytest.raises(IndexError, match="out of range for 3 records"):
        src[3]


def test_corrupt_records_are_skipped_with_warning_and_counted(tmp_path, caplog):
    _write(tmp_path / "m.jsonl", [
        _good(0), "{not json", _good(1), "[1, 2]", json.dumps({"uid": 9}),
        _good(2, images=["nope.png"]), _good(3, audios=[5]), _good(4)])
    with caplog.at_level(logging.WARNING, logger="omni_jax.data.sources"):
        src = sources.JsonlSource(tmp_path / "m.jsonl")
    assert [src[i]["uid"] for i in range(len(src))] == [0, 1, 4]
    assert src.num_corrupt == 5
    assert src.metrics() == {"records": 3, "corrupt_records": 5}
    lines = [e.split(": ", 1)[0].rsplit(":", 1)[1] for e in src.corrupt_examples]
    assert lines == ["2", "4", "5", "6", "7"]
    text = caplog.text
    for why in ("bad JSON", "expected a JSON object, got list", "missing required field(s) "
                "['messages']", "missing media file 'nope.png'", "expected a path string"):
        assert why in text


def test_corrupt_record_raises_when_asked(tmp_path):
    _write(tmp_path / "m.jsonl", [_good(0), _good(1), "{oops"])
    with pytest.raises(ValueError, match=r"corrupt record at .*m\.jsonl:3: bad JSON"):
        sources.JsonlSource(tmp_path / "m.jsonl", on_corrupt="raise")
    with pytest.raises(ValueError, match="on_corrupt must be one of"):
        sources.JsonlSource(tmp_path / "m.jsonl", on_corrupt="ignore")
    with pytest.raises(ValueError, match="does not exist"):
        sources.JsonlSource(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="expected a path string or bytes"):
        sources.read_media(3)


def test_tfds_array_record_round_trip_without_tensorflow(fixture_dir, tmp_path):
    root, manifests = fixture_dir
    names = ("image_caption", "speech_asr", "video_qa", "text_chat")
    src = sources.JsonlSource([manifests[n] for n in names])
    # a fresh interpreter proves no TensorFlow import is involved in write or read
    code = (
        "import sys, json\n"
        "from omni_jax.data import sources\n"
        f"src = sources.JsonlSource({[manifests[n] for n in names]!r})\n"
        f"d = sources.write_tfds({{'train': src}}, {str(tmp_path)!r})\n"
        "t = sources.TfdsSource(d, 'train')\n"
        "print(json.dumps({'dir': d, 'n': len(t), 'tf': 'tensorflow' in sys.modules}))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": _REPO})
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["n"] == len(src) and info["tf"] is False
    tfs = sources.TfdsSource(info["dir"], "train")
    want = {r["id"]: r for r in (src[i] for i in range(len(src)))}
    got = {r["id"]: r for r in tfs.__getitems__(range(len(tfs)))}
    assert sorted(got) == sorted(want)
    n_media = 0
    for rid, rec in got.items():
        ref = want[rid]
        assert rec["messages"] == ref["messages"]
        for key in ("images", "audios", "videos"):
            assert (key in rec) == (key in ref)
            if key in ref:
                flat = lambda v: [x for y in v for x in (y if isinstance(y, list) else [y])]
                assert all(isinstance(b, bytes) for b in flat(rec[key]))
                assert flat(rec[key]) == [sources.read_media(p) for p in flat(ref[key])]
                n_media += len(flat(ref[key]))
    assert n_media == 4 + 3 + 2 * 4  # images + audio clips + video frames
    with pytest.raises(ValueError, match="split 'test' not in"):
        sources.TfdsSource(info["dir"], "test")
    with pytest.raises(ValueError, match="not a prepared TFDS dataset directory"):
        sources.TfdsSource(tmp_path / "nowhere")


def test_fixtures_are_small_deterministic_and_labelled(fixture_dir, tmp_path):
    root, manifests = fixture_dir
    again = make_fixtures(tmp_path, seed=3, num_images=4, num_audio=3, num_videos=2, num_text=4)
    for name, path in manifests.items():
        with open(path) as f1, open(again[name]) as f2:
            assert f1.read() == f2.read()
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    for f in files:
        rel = os.path.relpath(f, root)
        with open(f, "rb") as a, open(tmp_path / rel, "rb") as b:
            assert a.read() == b.read(), rel
    assert sum(os.path.getsize(f) for f in files) < 2_000_000
    asr = sources.JsonlSource(manifests["speech_asr"])
    espeak = any(os.access(os.path.join(p, "espeak-ng"), os.X_OK)
                 for p in os.environ.get("PATH", "").split(os.pathsep))
    for i in range(len(asr)):
        assert asr[i]["audio_source"].startswith("espeak-ng:" if espeak else "tone")
        assert sources.read_media(asr[i]["audios"][0])[:4] == b"RIFF"
    tone = make_fixtures(tmp_path / "tone", seed=3, num_images=1, num_audio=2, num_videos=1,
                         num_text=1, use_espeak=False)
    assert {sources.JsonlSource(tone["speech_asr"])[i]["audio_source"] for i in range(2)} == {
        "tone"}
    cap = sources.JsonlSource(manifests["image_caption"])
    assert sources.read_media(cap[0]["images"][0])[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="must be >= 1"):
        make_fixtures(tmp_path / "bad", num_images=0)
