"""The notebooks run top to bottom on small settings, so they cannot rot."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import DATA_ROOT, REPO

pytestmark = pytest.mark.lab  # the demo / data-set readers / notebooks, not the library

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
# notebooks on the real vision demo (experts fine-tuned from ../shared/data, then cached)
NEEDS_DATA = {"fewshot.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, monkeypatch):
    if path.name in NEEDS_DATA and not (DATA_ROOT / "backbones" / "mobilenet_v2-b0353104.pth").is_file():
        pytest.skip(f"real data and mobilenet_v2 weights not found at {DATA_ROOT}")
    monkeypatch.setenv("ADAMERGE_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    # execute() raises on a failing cell; what is left to check is that every cell ran and the
    # notebook showed its results (a table, a figure or printed numbers) rather than nothing
    code = [c for c in notebook.cells if c.cell_type == "code" and c.source.strip()]
    assert all(c.get("execution_count") for c in code)
    shown = [o for c in code for o in c.get("outputs", []) if o.output_type in ("stream", "execute_result", "display_data")]
    assert shown and not any(o.get("name") == "stderr" and "Traceback" in o.get("text", "") for o in shown)
