"""notebooks/quickstart.ipynb runs top to bottom at tiny size on the CPU."""

import pathlib

import pytest

from tests.processes import xla_flags

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = pathlib.Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMJAX_QUICKSTART_TINY", "1")
    monkeypatch.setenv("PYTHONPATH", str(NOTEBOOK.parents[1]))
    monkeypatch.setenv("XLA_FLAGS", xla_flags())  # one CPU device: the cheapest compile
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert "optimizer state" in text and "params sha256" in text
    assert "shape-only memory of one train step at tiny" in text
    assert "| galore-svd-layerwise |" in text
    shown = [o for o in outputs if o.get("output_type") == "display_data"]
    assert any("text/markdown" in o["data"] and "galore-svd" in o["data"]["text/markdown"] for o in shown)
    assert sum("image/png" in o["data"] for o in shown) == 2
    # one run directory per size (a re-run after changing the size starts its own run)
    (run,) = (tmp_path / "runs").glob("quickstart-*")
    assert run.name == "quickstart-d32-l1-b1-s8-r8" and (run / "loss.png").exists()
    assert "REPO_URL" in nb.cells[1].source and "<owner>" not in nb.cells[1].source
