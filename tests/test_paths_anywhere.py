"""Paths anywhere: every path a recipe reads or writes besides the orbax workdir (data_root,
manifests, media, tokenizer, init checkpoints, export) goes through omni_jax.utils.fs, so
`gs://` works. The object store here is a fake: an fsspec file system registered for the
`gs` protocol that keeps its objects under a temporary directory (what gcsfs does remotely)."""

import os
import shutil
import sys

import fsspec
import numpy as np
import pytest
import torch
import transformers
from fsspec.implementations.local import LocalFileSystem

from omni_jax.convert import qwen2
from omni_jax.data.sources import JsonlSource, read_media
from omni_jax.llm.decoder import Decoder
from omni_jax.omni_config import OmniConfig
from omni_jax.recipes import final_params, load_recipe, load_run_config, make_plan, run
from omni_jax.recipes.run import export_llm
from omni_jax.utils import fs


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """gs://... -> <tmp>/gcs/... for this module's tests (one root: epath caches file systems)."""
    root = str(tmp_path_factory.mktemp("gcs"))

    class FakeGCS(LocalFileSystem):
        protocol = ("gs", "gcs")
        root_marker = ""

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path)
            if path.startswith(root):
                return path
            for p in ("gs://", "gcs://"):
                path = path.removeprefix(p)
            return os.path.join(root, path.lstrip("/"))

    saved = {n: fsspec.registry.get(n) for n in ("gs", "gcs")}
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    yield root
    for name, impl in saved.items():
        if impl is not None:
            fsspec.register_implementation(name, impl, clobber=True)
        else:
            sys.modules["fsspec.registry"]._registry.pop(name, None)  # undo our registration


def test_fs_helpers_keep_urls_intact(bucket):
    assert fs.abspath("gs://b/x") == "gs://b/x"
    assert fs.join("gs://b/dir", "a", "c.json") == "gs://b/dir/a/c.json"
    assert fs.resolve("gs://b/d/e", "../img/x.png") == "gs://b/d/img/x.png"
    assert fs.resolve("gs://b/d", "gs://other/y") == "gs://other/y"
    assert fs.resolve("/local/d", "./x/../y.png") == "/local/d/y.png"
    fs.makedirs("gs://b/new/dir")
    fs.write_text("gs://b/new/dir/t.txt", "hello")
    assert os.path.isfile(os.path.join(bucket, "b/new/dir/t.txt"))
    assert fs.isfile("gs://b/new/dir/t.txt") and fs.isdir("gs://b/new")
    assert not fs.exists("gs://b/missing") and fs.listdir("gs://b/new/dir") == ["t.txt"]
    with fs.local_file("gs://b/new/dir/t.txt") as local:
        assert open(local).read() == "hello" and not local.startswith("gs:")


def _upload(local: str, bucket: str, name: str) -> str:
    shutil.copytree(local, os.path.join(bucket, "bucket", name))
    return f"gs://bucket/{name}"


def test_recipe_runs_from_and_exports_to_gs(tmp_path, bucket):
    from omni_jax.data.fixtures import make_fixtures, train_fixture_tokenizer

    manifests = make_fixtures(tmp_path / "fx", num_images=4, num_audio=2, num_videos=1,
                              num_text=2, use_espeak=False)
    spm = train_fixture_tokenizer(manifests, 400, tmp_path / "spm")
    c = load_recipe("capybara:model=tiny")
    omni = OmniConfig.from_dict(c.model.to_dict())
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **qwen2.config_to_hf(omni.llm))).save_pretrained(tmp_path / "hf_llm")
    data_root = _upload(str(tmp_path / "fx"), bucket, "data")
    os.makedirs(os.path.join(bucket, "bucket", "tok"))
    shutil.copy(spm, os.path.join(bucket, "bucket", "tok", "spm.model"))
    c.data_root, c.tokenizer.path = data_root, "gs://bucket/tok/spm.model"
    c.init.llm = _upload(str(tmp_path / "hf_llm"), bucket, "init/llm")
    c.stage_order = ("phase1a",)
    c.stages.phase1a.steps = 2
    c.train.peak_flops, c.train.progress_bar, c.train.tensorboard = 1e9, False, False

    # the manifests' relative media refs resolve inside the bucket
    src = JsonlSource(fs.join(data_root, "image_caption.jsonl"))
    ref = src[0]["images"][0]
    assert ref.startswith("gs://bucket/data/") and read_media(ref)[:8] == b"\x89PNG\r\n\x1a\n"

    workdir = str(tmp_path / "run")  # orbax writes gs:// itself (tensorstore), not faked here
    assert run(c, workdir, echo=lambda s: None) == {"phase1a": "trained"}
    saved = load_run_config(workdir)
    assert saved.data_root == data_root and saved.init.llm == "gs://bucket/init/llm"
    export_llm(saved, workdir, "gs://bucket/export/llm")
    out = os.path.join(bucket, "bucket", "export", "llm")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    hf = transformers.Qwen2ForCausalLM.from_pretrained(out).eval()
    plan = make_plan(saved, count_data=False)[0]
    llm = final_params(workdir, plan)["llm"]
    ids = np.arange(3, 30, dtype=np.int32)[None]
    ours = Decoder(omni.llm).apply({"params": llm}, ids)["logits"]
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, rtol=0)


def test_missing_gs_paths_fail_clearly(bucket):
    with pytest.raises(ValueError, match="does not exist or is not a file"):
        JsonlSource("gs://bucket/nothing.jsonl")
    from omni_jax.convert import io

    with pytest.raises(ValueError, match="no config.json"):
        io.read_config("gs://bucket/no_model")
