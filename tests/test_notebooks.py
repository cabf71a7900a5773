"""The notebooks (jupytext percent-format scripts) run top to bottom and reach what they claim."""

import pathlib
import runpy

import matplotlib

from jaxkd import losses

NOTEBOOKS = pathlib.Path(__file__).parent.parent / "notebooks"


def run(name: str) -> dict:
    matplotlib.use("Agg")
    return runpy.run_path(str(NOTEBOOKS / name), run_name="__main__")


def test_compose_losses_notebook_distills_the_student_onto_the_teacher():
    # The notebook itself asserts its autodiff gradient against the closed form.
    ns = run("compose_losses.py")
    before = float(losses.kd(ns["student_logits"], ns["teacher_logits"], temperature=4.0))
    assert ns["final_kd"] < 0.05 * before


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.py")) == ["compose_losses.py"], "add a test for the new notebook"
