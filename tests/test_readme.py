"""The README's code examples run as written (the second continues the first)."""

import pathlib
import re

import jax

README = pathlib.Path(__file__).parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_compose_example_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))  # the digits are prepared here, not in ~
    example, participants = python_blocks()
    namespace = {}
    exec(compile(example, str(README), "exec"), namespace)
    state, metrics = namespace["state"], namespace["metrics"]
    assert int(state.step) == len(namespace["batches"])
    assert {"loss", "ce", "kd", "grad_norm", "accuracy"} <= set(metrics)
    assert all(bool(jax.numpy.isfinite(v)) for v in metrics.values())

    exec(compile(participants, str(README), "exec"), namespace)
    state, metrics = namespace["state"], namespace["metrics"]
    assert set(state.frozen) == {"teacher", "wrn"} and int(state.step) == 1
    assert {"multi_teacher_kd/teacher", "multi_teacher_kd/wrn"} <= set(metrics)
    assert all(bool(jax.numpy.isfinite(v)) for v in metrics.values())
