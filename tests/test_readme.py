"""The README's code example runs as written."""

import pathlib
import re

import jax

README = pathlib.Path(__file__).parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_compose_example_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))  # the digits are prepared here, not in ~
    (example,) = python_blocks()
    namespace = {}
    exec(compile(example, str(README), "exec"), namespace)
    state, metrics = namespace["state"], namespace["metrics"]
    assert int(state.step) == len(namespace["batches"])
    assert {"loss", "ce", "kd", "grad_norm", "accuracy"} <= set(metrics)
    assert all(bool(jax.numpy.isfinite(v)) for v in metrics.values())
