"""notebooks/explore.ipynb runs top to bottom on tiny data, so it never rots."""
from __future__ import annotations

import os
import shutil

import nbformat
from nbclient import NotebookClient

from helpers import ROOT


def test_notebook_executes_and_shows_pictures(tiny_data, tmp_path, monkeypatch):
    """Without MNIST_DATA_DIR the notebook reads ./data, as `mnist-dist train` does (a clone has no ../shared)."""
    monkeypatch.delenv("MNIST_DATA_DIR", raising=False)
    shutil.copytree(tiny_data, tmp_path / "data")
    monkeypatch.setenv("NB_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("NB_EPOCHS", "1")
    monkeypatch.setenv("NB_VERIFY_DATA", "0")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    nb = nbformat.read(ROOT / "notebooks" / "explore.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "test accuracy" in text and "test_acc" in text
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 3, "grid, confusion matrix and curves are shown"
    assert os.path.exists(tmp_path / "run" / "summary.json")
