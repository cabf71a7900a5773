"""The notebooks (.ipynb, each paired with a jupytext percent-format .py) run top to bottom on a fresh
kernel, produce their plots and reach what they claim; the stored .ipynb carries its outputs (plots
included) and is in sync with its .py."""

import os
import pathlib
import re

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).parent.parent
NOTEBOOKS = ROOT / "notebooks"


def images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.outputs)


def stdout(nb) -> str:
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
                   if out.output_type == "stream")


@pytest.fixture(scope="module")
def executed():
    """compose_losses.ipynb executed on a fresh kernel (about 10 s), importing this checkout's jaxkd."""
    nb = nbformat.read(NOTEBOOKS / "compose_losses.ipynb", as_version=4)
    env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "XLA_FLAGS")}  # inline plots, 1 device
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["JAX_PLATFORMS"] = "cpu"
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute(env=env)  # raises CellExecutionError on the first cell that fails
    return nb


def test_compose_losses_notebook_runs_plots_and_distills_the_student_onto_the_teacher(executed):
    # The notebook itself asserts its autodiff gradient against the closed form.
    assert not [out for cell in executed.cells if cell.cell_type == "code" for out in cell.outputs
                if out.output_type == "error"]
    assert images(executed) >= 1
    text = stdout(executed)
    assert "autodiff gradient matches the closed form" in text
    final, before = map(float, re.search(r"KD after 200 steps: ([\d.]+) \(from ([\d.]+)\)", text).groups())
    assert final < 0.05 * before


def test_stored_notebooks_carry_their_outputs_and_match_their_scripts():
    for path in NOTEBOOKS.glob("*.ipynb"):
        stored = nbformat.read(path, as_version=4)
        code = [cell for cell in stored.cells if cell.cell_type == "code"]
        assert all(cell.execution_count for cell in code), f"{path.name}: run it and save its outputs"
        assert images(stored) >= 1, f"{path.name}: stored without its plot"
        script = jupytext.read(path.with_suffix(".py"))
        assert [(c.cell_type, c.source) for c in script.cells] == [(c.cell_type, c.source) for c in stored.cells], (
            f"{path.name} and {path.with_suffix('.py').name} differ: jupytext --sync {path}")


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == ["compose_losses.ipynb"], "add a test for the new notebook"
    assert sorted(p.name for p in NOTEBOOKS.glob("*.py")) == ["compose_losses.py"], "pair the script with an .ipynb"
