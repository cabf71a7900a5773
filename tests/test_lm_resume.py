"""The LM comparison survives being killed, like the vision experiment (tests/test_resume.py): the script,
really killed (SIGKILL) while pretraining its teacher and while training a student, and preempted (SIGTERM),
then re-run with the same command, ends with the uninterrupted run's results, metrics records (each once)
and final parameters, bitwise; resuming with another method is refused, naming what differs."""

import glob
import json
import os
import signal
import subprocess
import sys

import pytest

from jaxkd.checkpoint import Checkpointer
from tests.test_lm_experiments import TINY_LM, _source
from tests.test_resume import ROOT, wait_for

SETTINGS = {**TINY_LM, "teacher_steps": 24, "steps": 16, "eval_every": 4, "checkpoint_every": 3, "seeds": (0,),
            "methods": {"scratch": "lm_ce", "token_kd": "lm_ce + token_kd(divergence='forward_kl')"}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few generated modules; the split is by path (the names give files in every split)."""
    root = tmp_path_factory.mktemp("lm_corpus")
    for i in range(24):
        (root / f"m{i}.py").write_text(_source("", i))
    return str(root)


def command(out, corpus, runs, *extra):
    # One persistent compilation cache for the test's processes (beside the corpus): the uninterrupted
    # reference compiles every program and each of the 5 later processes loads them instead of compiling
    # them again (the test's CPU time 48 s -> 39 s). Resuming still has to produce bitwise the same
    # state: a program that differs after a resume (other shapes, layouts or donation) has another cache
    # key and is compiled, never swapped for the reference's.
    args = [sys.executable, "-m", "experiments.lm_distill", "--out", str(out), "--set", f"corpus_dir={corpus}",
            "--set", f"out_dir={runs}",
            "--set", f"compilation_cache={os.path.join(os.path.dirname(corpus), 'lm_resume_xla_cache')!r}"]
    for key, value in SETTINGS.items():
        args += ["--set", f"{key}={value!r}"]
    for setting in extra:
        args += ["--set", setting]
    return args


def run(out, corpus, runs, *extra, check=True):
    done = subprocess.run(command(out, corpus, runs, *extra), cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def start(out, corpus, runs):
    return subprocess.Popen(command(out, corpus, runs), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": ROOT}, text=True)


def final_checksums(out, runs):
    """The checksum of every array of every run's last checkpoint: the teacher's and the students'."""
    sums = {}
    dirs = glob.glob(os.path.join(out, "checkpoints", "seed*", "*")) + glob.glob(
        os.path.join(runs, "teachers", "*", "training"))
    for run_dir in sorted(dirs):
        with Checkpointer(run_dir, read_only=True) as ckpt:
            manifest = ckpt.manifest(ckpt.latest_step())
        name = os.path.relpath(run_dir, out) if run_dir.startswith(str(out)) else "teacher"
        sums[name] = [(leaf["path"], leaf["sha256"]) for leaf in manifest["leaves"]]
    return sums


def results(out):
    with open(os.path.join(out, "results.json")) as f:
        summary = json.load(f)
    return summary["teacher_bpb"], [(r["run"], r["bpb_per_seed"]) for r in summary["rows"]]


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return sorted(f.read().splitlines())


@pytest.mark.slow  # 45 s: the kill/resume path is in the suite through tests/test_resume.py and test_hf_recipe.py; `pytest -m slow`
def test_lm_comparison_killed_anywhere_resumes_bitwise(corpus, tmp_path):
    reference = tmp_path / "reference"
    run(reference / "run", corpus, reference / "runs")

    out, runs = tmp_path / "run", tmp_path / "runs"
    # SIGTERM while pretraining the teacher: a checkpoint at that step, exit status 143, no traceback.
    proc = start(out, corpus, runs)
    wait_for(out, lambda rs: any(r["run"] == "teacher" and r.get("step", 0) >= 5 and "loss" in r for r in rs), proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert "preempted (SIGTERM)" in stderr and "Traceback" not in stderr
    # SIGKILL in the teacher's pretraining again, then in a student's run.
    proc = start(out, corpus, runs)
    wait_for(out, lambda rs: any(r["run"] == "teacher" and r.get("step", 0) >= 16 for r in rs), proc)
    proc.kill()
    proc.wait()
    proc = start(out, corpus, runs)
    wait_for(out, lambda rs: any(r["run"] == "token_kd" and r.get("step", 0) >= 7 for r in rs), proc)
    proc.kill()
    proc.wait()
    run(out, corpus, runs)

    assert results(out) == results(reference / "run")
    assert final_checksums(out, runs) == final_checksums(reference / "run", reference / "runs")
    assert records(out) == records(reference / "run")  # every record once, none lost, none duplicated

    # Another method under the same run name: refused, naming the difference, in one line.
    done = run(out, corpus, runs, "methods={'token_kd': \"lm_ce + token_kd(divergence='reverse_kl')\"}",
               check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "method: checkpoint has" in done.stderr and "reverse_kl" in done.stderr
