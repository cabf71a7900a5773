"""Multi-host training on one machine: two processes on 127.0.0.1 (2 x 4 CPU devices) give the same
result as one process with 8.

Each run is ``tests/multihost_worker.py`` in fresh subprocesses (a process can join only one
``jax.distributed`` run, and the device count is fixed when JAX starts): the same tiny distillation
(ce + kd, an fsdp-sharded state over a (data=2, fsdp=4) mesh, three steps), every process feeding its
own rows of each global batch. Cross-process collectives go through Gloo over TCP.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("multihost_worker.py")
TIMEOUT_S = 120  # per run; a healthy run takes a few seconds, a hung collective waits until killed
FAIL_GRACE_S = 10  # once one worker has failed, how long the others get to exit on their own
TOL = dict(rtol=1e-5, atol=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(out: Path, *, num_processes: int, devices: int, mesh: str = "data=2,fsdp=4"):
    """Starts the processes, waits for all of them; returns ``[(returncode, output), ...]``.

    A worker still running after the timeout, or some seconds after another one failed (it would wait
    for it in a collective), is killed and the test fails with every worker's output.
    """
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the worker sets its own device count
    env["JAX_PLATFORMS"] = "cpu"
    port = free_port()
    procs, logs = [], []
    for i in range(num_processes):
        log = open(out.parent / f"{out.stem}.{i}.log", "w+")
        cmd = [sys.executable, str(WORKER), "--process-id", str(i), "--num-processes", str(num_processes),
               "--port", str(port), "--devices-per-process", str(devices), "--mesh", mesh, "--out", str(out)]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
        logs.append(log)
    deadline, failed_at = time.monotonic() + TIMEOUT_S, None
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = time.monotonic()  # the others would wait for it in a collective: a short grace
            if failed_at is not None and time.monotonic() > failed_at + FAIL_GRACE_S:
                break
            time.sleep(0.1)
    finally:
        stuck = [p for p in procs if p.poll() is None]
        for p in stuck:
            p.kill()
            p.wait()
    results = []
    for p, log in zip(procs, logs):
        log.seek(0)
        results.append((p.returncode, log.read()))
        log.close()
    if stuck:
        why = "after another failed" if failed_at is not None else f"after {TIMEOUT_S} s"
        pytest.fail(f"{len(stuck)} of {num_processes} worker(s) still running {why}, killed:\n" + report(results))
    return results


def report(results) -> str:
    return "\n".join(f"--- process {i} (exit {rc}) ---\n{text[-4000:]}" for i, (rc, text) in enumerate(results))


def run_ok(out: Path, **kwargs) -> dict:
    results = run_workers(out, **kwargs)
    if any(rc != 0 for rc, _ in results):
        pytest.fail("a worker failed:\n" + report(results))
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    one = run_ok(tmp / "one.npz", num_processes=1, devices=8)
    two = run_ok(tmp / "two.npz", num_processes=2, devices=4)
    return one, two


def params(run: dict) -> dict:
    return {k: v for k, v in run.items() if k.startswith("param/")}


def test_two_processes_with_four_devices_match_one_with_eight(runs):
    one, two = runs
    assert (int(one["process_count"]), int(one["device_count"])) == (1, 8)
    assert (int(two["process_count"]), int(two["device_count"])) == (2, 8)
    assert int(one["step"]) == int(two["step"]) == 3
    # losses[step] = (loss, ce, kd)
    assert one["losses"].shape == two["losses"].shape == (3, 3)
    np.testing.assert_allclose(two["losses"], one["losses"], **TOL)
    assert not np.allclose(one["losses"][0], one["losses"][-1])  # the steps did something
    assert set(params(one)) == set(params(two)) == {"param/dense1/kernel", "param/dense1/bias",
                                                     "param/fc/kernel", "param/fc/bias"}
    for key, value in params(one).items():
        assert value.dtype == two[key].dtype == np.float32
        np.testing.assert_allclose(two[key], value, **TOL, err_msg=key)


def test_the_processes_slices_form_the_global_batch(runs):
    one, two = runs
    assert bool(one["batch_assembled"]) and bool(two["batch_assembled"])


def test_parameters_are_split_over_fsdp(runs):
    one, two = runs
    # The student's first kernel is [16, 64]: split on its 64 outputs over fsdp=4, whole over data=2.
    assert str(one["spec"]) == str(two["spec"]) == "P(None, 'fsdp')"
    assert one["param/dense1/kernel"].shape == (16, 64)
    assert one["shard_shapes"].tolist() == [[16, 16]] * 8  # all 8 devices are process 0's
    assert two["shard_shapes"].tolist() == [[16, 16]] * 4  # process 0's 4 devices
    assert two["teacher_shard_shapes"].tolist() == [[16, 32]] * 4  # the frozen teacher's [16, 128] kernel


@pytest.mark.slow  # 7 s: two processes for an error path; the two-host step stays in the suite; `pytest -m slow`
def test_a_mesh_that_makes_hosts_replicas_is_refused(tmp_path):
    # Pure tensor parallelism across both hosts: every device needs the whole batch, but each host has
    # only its half. Without the check each host silently trained on its own 8 examples.
    results = run_workers(tmp_path / "tensor.npz", num_processes=2, devices=4, mesh="tensor=8")
    assert all(rc != 0 for rc, _ in results), report(results)
    for i, (_, text) in enumerate(results):
        assert f"process {i} of 2 passes its 8 examples" in text, report(results)
        assert "must hold its own contiguous block of the batch" in text, report(results)
