"""The notebooks of notebooks/ run top to bottom in small mode (OMNI_JAX_NB_SMALL=1) in a fresh
kernel of this interpreter, in a temporary directory, and show what they promise: the stage x
group table (trained / frozen, as the recipe's stages say and as the checkpoints confirm), the
sharded parameter tree, a chat answer, the LGAP weights recomputed exactly, figures, audio; the
curriculum's loss curves and evaluation tables. Committed notebooks carry no outputs."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "omni-jax-notebook-test"
# the groups OpenOmni's stages I-IV train (notebook 1), by the recipe's trainable patterns
TRAINED = {"speech_text": {"audio_adapter"}, "image_pretrain": {"image_adapter"},
           "image_instruct": {"llm", "image_adapter", "image_encoder"},
           "speech_gen": {"speech"}}
OLA_STAGES = ("image_align", "image_text", "video", "speech_align", "speech")


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """A kernel spec running ipykernel on sys.executable (this venv), found via JUPYTER_PATH,
    and the notebooks' small settings in the environment the kernel inherits."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "omni_jax (test)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("OMNI_JAX_NB_SMALL", "1")
    monkeypatch.setenv("OMNI_JAX_NB_DIR", str(tmp_path / "work"))
    monkeypatch.delenv("OMNI_JAX_NB_WORKDIR", raising=False)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return tmp_path


def execute(name: str, cwd: Path) -> tuple[nbformat.NotebookNode, float]:
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=900,
                            resources={"metadata": {"path": str(cwd)}})
    t0 = time.time()
    try:
        client.execute()  # CellExecutionError (with the cell's traceback) on a failing cell
    finally:
        nbformat.write(nb, cwd / name)  # the executed copy, for a look after a failure
    seconds = time.time() - t0
    print(f"{name}: executed in {seconds:.0f} s; seconds per code cell: {cell_seconds(nb)}")
    return nb, seconds


def cell_seconds(nb: nbformat.NotebookNode) -> list[float]:
    from datetime import datetime

    out = []
    for cell in nb.cells:
        t = cell.metadata.get("execution", {})
        if "iopub.execute_input" in t and "shell.execute_reply" in t:
            a, b = (datetime.fromisoformat(t[k].replace("Z", "+00:00"))
                    for k in ("iopub.execute_input", "shell.execute_reply"))
            out.append(round((b - a).total_seconds(), 1))
    return out


def outputs(nb: nbformat.NotebookNode) -> tuple[str, int, int]:
    """(all text output, number of PNG figures, number of <audio> players)."""
    text, figures, audio = [], 0, 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                text.append(out.text)
            elif out.output_type in ("execute_result", "display_data"):
                data = out.get("data", {})
                figures += "image/png" in data
                audio += "<audio" in data.get("text/html", "")
                text.append(data.get("text/plain", ""))
    return "\n".join(text), figures, audio


def test_committed_notebooks_have_no_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, path.name
        first = nb.cells[1].source  # the Colab install cell, skipped when omni_jax imports
        assert "import omni_jax" in first and "%pip install" in first, path.name


def test_inspect_a_trained_run(kernel):
    nb, _ = execute("01_inspect_a_trained_run.ipynb", kernel)
    text, figures, audio = outputs(nb)
    # the run trained every stage; the table: one row per stage, one column per group
    assert "'speech_gen': 'trained'" in text, text[-3000:]
    lines = text.splitlines()
    head = lines.index("stage x group: trained / frozen")
    groups = lines[head + 1].split()[1:-1]
    assert {"llm", "speech", "image_adapter", "audio_adapter", "image_encoder"} <= set(groups)
    rows = {r.split()[0]: r.split() for r in lines[head + 2:head + 2 + len(TRAINED)]}
    assert set(rows) == set(TRAINED)
    for stage, want in TRAINED.items():
        cells = dict(zip(groups, rows[stage][1:1 + len(groups)]))
        assert {g for g, c in cells.items() if c == "trained"} == want, (stage, cells)
        assert all(c == "frozen" for g, c in cells.items() if g not in want), (stage, cells)
    for stage in list(TRAINED)[1:]:  # the checkpoints agree: exactly the trained groups moved
        assert "changed = trained" in " ".join(rows[stage]), rows[stage]
    # the parameter tree lists leaves with shapes and their NamedSharding specs
    assert re.search(r"llm/\S+\s+\(\d+, \d+\)\s+float32\s+(P|PartitionSpec)\(", text), text[:3000]
    assert re.search(r"answer: '.+'", text), "no chat answer"
    assert "speech: generator" in text
    assert re.search(r"speech generator: \d+ sentence\(s\), [1-9]\d* units", text), text[-2000:]
    assert text.count("LGAP recomputed") == 2  # low- and high-res view
    assert figures >= 4 and audio >= 2, (figures, audio)  # image, mel, LGAP, units; 2 players


def test_train_a_short_curriculum(kernel):
    nb, _ = execute("02_train_a_short_curriculum.ipynb", kernel)
    text, figures, audio = outputs(nb)
    for stage in OLA_STAGES:
        assert re.search(rf"stage {stage}: loss \d+\.\d+ \(step 1\) -> \d+\.\d+ \(step 3\)",
                         text), stage
        # the loss read back from TensorBoard equals the run's echo (3 steps per stage)
        assert re.search(rf"^{stage}\s+loss \d+\.\d+ \(step 1\) -> \d+\.\d+ \(step 3\)$", text,
                         re.M), stage
        assert re.search(rf"^{stage}: \d+ record\(s\) evaluated", text, re.M), stage
    echoed = re.findall(r"stage (\w+): loss (\d+\.\d+) \(step 1\) -> (\d+\.\d+)", text)
    read = re.findall(r"^(\w+)\s+loss (\d+\.\d+) \(step 1\) -> (\d+\.\d+)", text, re.M)
    assert echoed == read and len(read) == len(OLA_STAGES)
    assert "evaluation: stage x metric" in text
    for metric in ("image_qa_accuracy", "video_qa_accuracy", "asr_wer", "text_chat_accuracy"):
        assert metric in text
    assert figures >= 2, figures  # loss curves, metrics per stage
