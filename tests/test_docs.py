"""The documentation (docs/, Sphinx) builds without a warning, covers every public module, and its code
examples run as written."""

import os
import pathlib
import pkgutil
import re
import subprocess
import sys
import time

import jax

import jaxkd

ROOT = pathlib.Path(__file__).parent.parent
DOCS = ROOT / "docs"


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


def test_docs_build_without_warnings(tmp_path):
    # About 17 s of CPU (2-core x86; 35 s wall while other jobs shared the cores): autodoc importing every
    # module and rendering its docstrings, the theme, the pages.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-d", str(tmp_path / "doctrees"),
         str(DOCS), str(tmp_path / "html")],
        capture_output=True, text=True, env={**env, "JAX_PLATFORMS": "cpu"}, timeout=600,
    )
    seconds = time.perf_counter() - start
    assert result.returncode == 0, f"sphinx-build failed or warned ({seconds:.0f} s):\n{result.stdout}\n{result.stderr}"
    html = tmp_path / "html"
    for page in ("index", "getting_started", "write_your_own_method", "lm_distillation", "multi_device", "results",
                 "api/index", "api/generated/jaxkd.losses", "api/generated/jaxkd.train_state",
                 "notebooks/compose_losses"):
        assert (html / f"{page}.html").exists(), page
    losses = (html / "api" / "generated" / "jaxkd.losses.html").read_text()
    assert 'id="module-jaxkd.losses.core"' in losses and "jaxkd.losses.logit.html" in losses  # links its families
    logit = (html / "api" / "generated" / "jaxkd.losses.logit.html").read_text()
    assert 'id="module-jaxkd.losses.logit.dkd"' in logit and 'id="jaxkd.losses.logit.dkd.dkd"' in logit
    methods = (html / "api" / "generated" / "jaxkd.methods.feature.html").read_text()
    assert 'id="jaxkd.methods.feature.fitnets.fitnets"' in methods
    # The notebook page shows the plot stored in the notebook's outputs.
    assert "<img" in (html / "notebooks" / "compose_losses.html").read_text()


def test_api_reference_lists_every_top_level_module():
    listed = (DOCS / "api" / "index.md").read_text()
    modules = [m.name for m in pkgutil.iter_modules(jaxkd.__path__) if not m.name.startswith("_")]
    assert modules
    for name in modules:
        assert re.search(rf"^\s+jaxkd\.{name}$", listed, re.M), f"docs/api/index.md does not list jaxkd.{name}"


def test_getting_started_examples_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))  # the digits are prepared here, not in ~
    example, participants, evaluation = python_blocks("getting_started.md")
    namespace = {}
    exec(compile(example, "docs/getting_started.md", "exec"), namespace)
    state, metrics = namespace["state"], namespace["metrics"]
    assert int(state.step) == len(namespace["batches"])
    assert {"loss", "ce", "kd", "grad_norm", "accuracy"} <= set(metrics)
    assert all(bool(jax.numpy.isfinite(v)) for v in metrics.values())

    exec(compile(participants, "docs/getting_started.md", "exec"), namespace)  # continues the first
    state, metrics = namespace["state"], namespace["metrics"]
    assert set(state.frozen) == {"teacher", "wrn"} and int(state.step) == 1
    assert {"multi_teacher_kd/teacher", "multi_teacher_kd/wrn"} <= set(metrics)
    assert all(bool(jax.numpy.isfinite(v)) for v in metrics.values())

    exec(compile(evaluation, "docs/getting_started.md", "exec"), namespace)  # on the same state
    result = namespace["result"]
    assert {"accuracy", "teacher_accuracy", "agreement", "kl", "count"} <= set(result)
    assert "wrn_accuracy" not in result  # frozen=False: a frozen participant no metric reads is skipped
    assert 0.0 <= result["agreement"] <= 1.0 and result["kl"] >= 0.0


def test_write_your_own_method_examples_run():
    namespace = {}
    try:
        for block in python_blocks("write_your_own_method.md"):  # each continues the previous one
            exec(compile(block, "docs/write_your_own_method.md", "exec"), namespace)
    finally:
        jaxkd.methods.REGISTRY.pop("hint", None)  # the last block registers the guide's method
    state, metrics = namespace["state"], namespace["metrics"]
    assert int(state.method_vars.state["hint"]["calls"]) == 3 and "hint" in metrics
    assert all(bool(jax.numpy.isfinite(v)) for v in metrics.values())
    assert [term.name for term in namespace["method"].terms] == ["ce", "hint"]
    assert namespace["needs"] == jaxkd.methods.Needs(participants=("teacher",), labels=True)
    assert "needs a teacher" in namespace["message"] and "['student']" in namespace["message"]


def test_every_results_table_is_printed_beside_its_command():
    from tests.test_readme import tables

    for page in ("results.md", "benchmarks.md"):
        lines = (DOCS / page).read_text().splitlines()
        found = tables("\n".join(lines))
        assert found, page
        for start, table in found:
            before = "\n".join(lines[max(0, start - 30):start])
            assert re.search(r"python (-m experiments\.|benchmarks/)", before), f"{page}: no command before\n{table}"
