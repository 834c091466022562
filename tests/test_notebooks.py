"""The notebooks run top to bottom against the fixture sweep's collected table (so they cannot rot).

Each notebook is executed in a fresh kernel with EM_SWEEP_TABLE pointing at the collected fixture;
any cell error fails the test. (``pytest --nbmake notebooks/`` runs them against the example sweep.)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from em_sweep.analysis.collect import collect, write_tables

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
FIXTURE = Path(__file__).parent / "fixtures" / "mini_sweep"


@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nb") / "sweep"
    shutil.copytree(FIXTURE, root)
    write_tables(collect(root, progress=False), root / "collected")
    return root / "collected"


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_collected_table.ipynb", "02_findings.ipynb"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_on_the_fixture(path, collected, monkeypatch):
    monkeypatch.setenv("EM_SWEEP_TABLE", str(collected))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "7 runs" in outputs
    if path.name == "02_findings.ipynb":
        assert "peak (step, mean score): (5," in outputs
        images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
        assert len(images) >= 6
