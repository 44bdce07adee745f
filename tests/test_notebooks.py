"""The notebooks run top to bottom on the embedded default (fast training budget) and are stored clean."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_provenance.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear outputs before committing"


def _execute(path, tmp_path, monkeypatch) -> list:
    """Run a notebook top to bottom; return every code cell output (no cell may raise)."""
    # the kernel inherits this environment: small training budget, a private cache, no Hub, two threads
    monkeypatch.setenv("HF_MIRROR_DEMO_FAST", "1")
    monkeypatch.setenv("HF_MIRROR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(path.parents[1]), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=900,  # per cell: the first trains the demo model, slow on a busy 2-core machine
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # jupyter_client starts the "python3" kernel with sys.executable: the project's venv
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs


def _text(outputs) -> str:
    return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    outputs = _execute(NOTEBOOKS[0], tmp_path, monkeypatch)
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any('class="hfm"' in h and "supports the generation" in h for h in html), "the result renders as HTML"
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 2, "both plots are displayed"
    assert (tmp_path / "quickstart-run" / "topk.parquet").exists()


def test_provenance_notebook_runs(tmp_path, monkeypatch):
    path = next(p for p in NOTEBOOKS if p.name == "02_provenance.ipynb")
    outputs = _execute(path, tmp_path, monkeypatch)
    text = _text(outputs)
    assert "contamination rate 60%" in text  # the two copies and the edited copy, not the two clean sentences
    assert "('copy-a', True, 1.0" in text and "('clean-a', False, 0.0" in text
    # the edited copy really differs from its source, and the n-gram spans around the edit still catch it
    assert "('edited', True, " in text and "('edited', True, 1.0" not in text and "edited copy: leaked=True" in text
    assert any("image/png" in o.get("data", {}) for o in outputs), "the Min-K% histogram is displayed"
    assert any('class="hfm"' in o.get("data", {}).get("text/html", "") for o in outputs)
