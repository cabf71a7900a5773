"""Every notebook under notebooks/ runs top to bottom (they are jupytext percent-format scripts)."""

import pathlib
import runpy

import matplotlib
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.py"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    matplotlib.use("Agg")
    runpy.run_path(str(path), run_name="__main__")


def test_there_are_notebooks():
    assert NOTEBOOKS
