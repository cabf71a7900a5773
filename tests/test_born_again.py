"""The born-again script end to end on tiny settings: generations distilled from the saved previous generation, an
interrupted run resumed to the uninterrupted run's results, BANE of one generation equal to that generation, bad
configs refused before anything trains."""

import os

import pytest

import jaxkd
from experiments import born_again

TINY = [
    "student=mlp", "student_kwargs={'hidden_sizes': (8,)}", "steps=10", "eval_every=10", "seeds=(0,)",
    "batch_size=32", "eval_batch_size=250", "generations=1", "compilation_cache=None",
]


def _args(out, extra=()):
    return ["--out", str(out)] + sum((["--set", s] for s in [*TINY, *extra]), [])


def _rows(summary):
    return {r["run"]: r["top1_per_seed"] for r in summary["rows"]}


# Slow (the suite's time): three tiny generations; each generation is a distill run (tests/test_experiment.py).
@pytest.mark.slow
def test_generations_then_a_rerun_returns_the_same_results_without_training(tmp_path, monkeypatch):
    first = born_again.main(_args(tmp_path / "a"))
    rows = _rows(first)
    assert list(rows) == ["gen0", "gen1", "bane"]
    # An ensemble of one generation predicts what that generation predicts (computed by the ensemble's own
    # softmax-mean path, against the train state's evaluation).
    assert rows["bane"] == rows["gen1"]
    assert os.path.isdir(tmp_path / "a" / "generations" / "seed0" / "gen1")
    # Re-running the command restores every finished generation from its checkpoint: no step runs again.
    def no_steps(*args, **kwargs):
        def step(*args, **kwargs):
            raise AssertionError("a finished generation trained again")
        return step

    monkeypatch.setattr(jaxkd, "make_train_step", no_steps)
    assert _rows(born_again.main(_args(tmp_path / "a"))) == rows


@pytest.mark.slow  # 3 tiny pipelines (~20 s); the fast test above covers the pipeline and the resume of finished
# generations, tests/test_resume.py the resume of an interrupted run inside Runner.fit.
def test_generations_resume_after_an_interruption_to_the_uninterrupted_results(tmp_path, monkeypatch):
    rows = _rows(born_again.main(_args(tmp_path / "a")))
    real_fit = born_again.distill.fit

    def killed_at_gen1(*args, run, **kwargs):
        if run == "gen1":
            raise KeyboardInterrupt("killed")
        return real_fit(*args, run=run, **kwargs)

    monkeypatch.setattr(born_again.distill, "fit", killed_at_gen1)
    with pytest.raises(KeyboardInterrupt):
        born_again.main(_args(tmp_path / "b"))
    assert os.path.isdir(tmp_path / "b" / "generations" / "seed0" / "gen0")
    monkeypatch.setattr(born_again.distill, "fit", real_fit)
    resumed = born_again.main(_args(tmp_path / "b"))
    assert _rows(resumed) == rows


@pytest.mark.parametrize("setting, match", [
    ("method=ce + dml", "must read only the participant 'teacher'"),
    ("first_method=ce + kd", "generation 0 has no teacher"),
    ("generations=0", "generations"),
])
def test_bad_configs_are_refused_before_training(tmp_path, setting, match):
    with pytest.raises(ValueError, match=match):
        born_again.main(_args(tmp_path / "run", [setting]))
