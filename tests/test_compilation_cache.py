"""JAX's persistent compilation cache (jaxkd/compilation_cache.py): where it goes, and that a second run of
the experiment script compiles nothing the first one compiled (two fresh processes on a tiny run)."""

import json
import os
import subprocess
import sys

import pytest

from jaxkd import compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["teacher=mlp", "teacher_kwargs={'hidden_sizes': (16,)}", "student=mlp", "student_kwargs={'hidden_sizes': (8,)}",
        "teacher_steps=3", "steps=3", "eval_every=3", "seeds=(0,)", "batch_size=16", "eval_batch_size=256",
        "methods={'kd': 'ce + kd(temperature=4)'}", "tensorboard=False"]

# One process: the experiment, then the compile counts of that process as the last line.
DRIVER = """
import json, sys
from experiments import distill
from jaxkd import compilation_cache
distill.main(sys.argv[1:])
print(json.dumps(compilation_cache.compile_counts()))
"""


def test_default_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXKD_COMPILATION_CACHE", str(tmp_path / "xla"))
    assert compilation_cache.default_directory() == str(tmp_path / "xla")
    monkeypatch.setenv("JAXKD_COMPILATION_CACHE", "")
    assert compilation_cache.default_directory() is None
    assert compilation_cache.enable() is None  # off: nothing is configured
    monkeypatch.delenv("JAXKD_COMPILATION_CACHE")
    assert compilation_cache.default_directory() == os.path.join(os.path.expanduser("~"), ".cache", "jaxkd", "xla")
    assert compilation_cache.enable(None) is None
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        compilation_cache.enable(str(tmp_path / "file"))


def test_an_unwritable_cache_folder_warns_once_and_runs_without_the_cache(tmp_path, caplog):
    # Root writes anywhere, so the folder is made impossible instead: its parent is a regular file.
    (tmp_path / "file").write_text("")
    unwritable = str(tmp_path / "file" / "xla")
    with caplog.at_level("WARNING", logger="jaxkd.compilation_cache"):
        assert compilation_cache.enable(unwritable) is None
        assert compilation_cache.enable(unwritable) is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "jaxkd.compilation_cache"]
    assert len(warnings) == 1 and unwritable in warnings[0] and "without" in warnings[0], warnings
    import jax
    assert jax.config.jax_compilation_cache_dir != unwritable


@pytest.mark.slow  # 13 s: two experiment processes; the cache folder's handling stays in the suite (this file); `pytest -m slow`
def test_a_second_run_of_the_experiment_compiles_nothing(tmp_path):
    cache = tmp_path / "xla"
    counts = []
    for run in ("first", "second"):
        args = ["--out", str(tmp_path / run), "--set", f"data_dir={tmp_path / 'tfds'}",
                "--set", f"compilation_cache={cache}"] + sum((["--set", s] for s in TINY), [])
        out = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        counts.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, second = counts
    # The first run already loads some programs: those it compiles again after clearing JAX's in-memory
    # caches between phases. The second compiles none and loads every one.
    assert first["compiled"] > 10, counts
    assert second == {"compiled": 0, "loaded": first["compiled"] + first["loaded"]}, counts
    assert len(os.listdir(cache)) >= first["compiled"]
