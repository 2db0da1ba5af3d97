"""Notebooks as users run them ("Run All" in Jupyter): every cell, slow ones and `eval: false` ones included,
in a real Jupyter kernel — whose `sys.argv` is the kernel's own and whose `__name__` is `"__main__"`."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NBS = Path(__file__).resolve().parents[1] / "nbs"


@pytest.mark.parametrize("name", ["04_loader", "90_cli"])
def test_notebook_runs_in_a_real_kernel(name):
    nb = nbformat.read(NBS / f"{name}.ipynb", as_version=4)
    assert any("#| slow" in c.source for c in nb.cells)               # the slow cells run here too
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NBS)}}).execute()
    ran = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    assert ran and all(c.get("execution_count") for c in ran)         # every code cell ran (a failing one raises)
