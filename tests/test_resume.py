"""Runs that survive: the experiment script, really killed (SIGKILL) and preempted (SIGTERM) in
subprocesses and re-run with the same command, ends with the uninterrupted run's results.json,
metrics.jsonl records (each exactly once) and final parameters bitwise (checkpoint checksums); a damaged
newest checkpoint falls back to the newest intact one, saying so; another configuration is refused."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxkd.checkpoint import Checkpointer

SETTINGS = [
    "teacher=mlp", "teacher_kwargs={'hidden_sizes': (32,)}", "student=mlp", "student_kwargs={'hidden_sizes': (8,)}",
    "teacher_steps=40", "steps=30", "eval_every=10", "seeds=(0,)", "batch_size=32", "eval_batch_size=128",
    "checkpoint_every=7", "methods={'kd': 'ce + kd(temperature=4)'}",
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(out, *extra):
    # One persistent compilation cache for a test's processes (beside their run folders): the first compiles,
    # the later ones load (as tests/test_lm_resume.py); a program that differs after a resume has another key.
    cache = os.path.join(os.path.dirname(os.path.abspath(out)), "xla_cache")
    args = [sys.executable, "-m", "experiments.distill", "--out", str(out), "--set", f"compilation_cache={cache!r}"]
    for setting in (*SETTINGS, *extra):
        args += ["--set", setting]
    return args


def start(out, *extra):
    return subprocess.Popen(command(out, *extra), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": ROOT}, text=True)


def wait_for(out, predicate, proc, timeout=120):
    """Polls metrics.jsonl until ``predicate(records)`` holds (the process must still be running)."""
    deadline = time.time() + timeout
    path = os.path.join(out, "metrics.jsonl")
    while time.time() < deadline:
        assert proc.poll() is None, f"the run ended before it could be interrupted:\n{proc.communicate()[1][-3000:]}"
        if os.path.exists(path):
            records = []
            for line in open(path):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
            if predicate(records):
                return
        time.sleep(0.05)
    raise TimeoutError("the run never reached the point to interrupt it")


def finish(out, *extra):
    done = subprocess.run(command(out, *extra), cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def final_checksums(out):
    """Per run: the checksum of every array of its final checkpoint (the trained state)."""
    sums = {}
    for run_dir in sorted(glob.glob(os.path.join(out, "checkpoints", "seed*", "*"))):
        with Checkpointer(run_dir, read_only=True) as ckpt:
            manifest = ckpt.manifest(ckpt.latest_step())
        sums[os.path.relpath(run_dir, out)] = [(leaf["path"], leaf["sha256"]) for leaf in manifest["leaves"]]
    return sums


def results(out):
    with open(os.path.join(out, "results.json")) as f:
        return [(r["run"], r["top1_per_seed"]) for r in json.load(f)["rows"]]


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return sorted(f.read().splitlines())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    finish(out)
    return out


def test_killed_and_preempted_runs_end_bitwise_equal_to_an_uninterrupted_one(reference, tmp_path):
    out = tmp_path / "run"
    # SIGTERM in the teacher's run: a checkpoint at that step, a clean exit (143), no traceback.
    proc = start(out)
    wait_for(out, lambda rs: any(r["run"] == "teacher" and r.get("step", 0) >= 10 and "loss" in r for r in rs), proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert "preempted (SIGTERM)" in stderr and "Traceback" not in stderr
    preempted_at = int(stderr.split("at step ")[1].split(":")[0])
    with Checkpointer(out / "checkpoints" / "seed0" / "teacher", read_only=True) as ckpt:
        assert ckpt.latest_step() == preempted_at
    # SIGKILL twice more: in the teacher's run again and in the student's, at whatever it is doing then.
    proc = start(out)
    wait_for(out, lambda rs: any(r["run"] == "teacher" and r.get("step", 0) >= 33 for r in rs), proc)
    proc.kill()
    proc.wait()
    proc = start(out)
    wait_for(out, lambda rs: any(r["run"] == "kd" and r.get("step", 0) >= 16 for r in rs), proc)
    proc.kill()
    proc.wait()
    finish(out)

    assert results(out) == results(reference)
    assert final_checksums(out) == final_checksums(reference)
    assert records(out) == records(reference)  # every record once, none lost, none duplicated


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(reference, tmp_path):
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(reference), str(out)], check=True)
    kd = out / "checkpoints" / "seed0" / "kd"
    with Checkpointer(kd, read_only=True) as ckpt:
        newest, steps = ckpt.latest_step(), ckpt.steps()
    # Truncate the largest array file of the newest (final) step.
    files = [f for f in glob.glob(str(kd / str(newest) / "**" / "*"), recursive=True) if os.path.isfile(f)]
    victim = max(files, key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    done = finish(out)
    assert f"resuming from step {steps[-2]}" in done.stderr and "damaged" in done.stderr
    assert results(out) == results(reference)
    assert final_checksums(out) == final_checksums(reference)
    assert records(out) == records(reference)


def test_resuming_with_another_configuration_is_refused_naming_the_difference(reference, tmp_path):
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(reference), str(out)], check=True)
    done = subprocess.run(command(out, "methods={'kd': 'ce + kd(temperature=8)'}"), cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode != 0
    assert 'method: checkpoint has "ce + kd(temperature=4)", given "ce + kd(temperature=8)"' in done.stderr
