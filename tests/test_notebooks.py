"""Every notebook is valid and runs top to bottom on the committed result files (no kernel: cells are executed
in one namespace with a non-interactive matplotlib backend), drawing at least one figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_on_the_committed_results(path, monkeypatch):
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    monkeypatch.chdir(ROOT / "notebooks")
    plt.close("all")
    namespace: dict = {}
    for cell in nb.cells:
        if cell.cell_type == "code":
            exec(compile(cell.source, f"{path.name}", "exec"), namespace)
    assert plt.get_fignums(), "the notebook draws no figure"
    plt.close("all")
