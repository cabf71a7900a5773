"""The one experiment runner: the command line, the run folder, and the resumable fit loop every experiment
script shares (vision: :mod:`experiments.distill`; language models: :mod:`experiments.lm_distill`,
:mod:`experiments.lm_cross_tokenizer`, :mod:`experiments.lm_fusion`, :mod:`experiments.hf_distill`).

A script is its config class, its data and its evaluation; this module does the rest:

* :func:`command_line`: ``--config`` (a Python file with ``get_config()``), repeatable ``--set KEY=VALUE``
  (validated; an unknown key names the closest field), ``--out`` and ``--debug``;
* :func:`run_folder`: one process per run folder (a second one on the same ``--out`` is refused, naming the
  first's pid), the experiment's compilation cache and, with ``distributed``, the multi-host start;
* :class:`Runner`: :meth:`Runner.fit` trains one run resumably — a checkpoint every ``checkpoint_every`` steps
  and at the end (train state, the data iterators' positions, the final result), exact resume after SIGKILL
  from the newest intact checkpoint, a checkpoint and exit status 143 on SIGTERM, ``metrics.jsonl`` and
  TensorBoard records written once each, a progress bar and the time breakdown;
* :func:`entry_point`: what ``python -m experiments.<script>`` runs — an error is one line naming the field
  or file (the traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

import jaxkd
from jaxkd import compilation_cache, sharding
from jaxkd.checkpoint import Checkpointer
from jaxkd.steps import StepFailedError

from experiments import config as config_lib
from experiments.run_log import MetricsLog, Preempted, PreemptionFlag
from experiments.timing import Phases

log = logging.getLogger("jaxkd.experiment")

#: Exit status of a run stopped by SIGTERM after saving its checkpoint (128 + SIGTERM, what shells report).
PREEMPTED_STATUS = 143
#: Exit status of a run refused for its input (a bad config, a missing file, a busy run folder).
USAGE_STATUS = 2


# ----- the command line -----


def command_line(argv: list[str] | None, *, description: str, config_type: type,
                 default_config: str | None = None) -> tuple[Any, str, argparse.Namespace]:
    """``(config, out_dir, args)`` of a script's command line: ``--config`` (default ``default_config``, or the
    config class's defaults when None), ``--set KEY=VALUE`` overrides applied and validated, ``--out`` (default
    ``<out_dir>/<name>-<time>``) and ``--debug``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=default_config,
                        help="a Python file with get_config() (default: the script's own)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field; repeatable (methods.NAME=SPEC sets one entry)")
    parser.add_argument("--out", default=None, help="run folder (default: <out_dir>/<name>-<time>); re-running "
                                                    "with the same folder resumes it")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    cfg = config_lib.apply_overrides(config_lib.load(args.config, config_type), args.overrides)
    out_dir = args.out or os.path.join(cfg.out_dir, f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return cfg, out_dir, args


class RunFolderBusy(RuntimeError):
    """Another process holds the folder's lock."""


@contextlib.contextmanager
def folder_lock(path: str, what: str) -> Iterator[None]:
    """Holds an exclusive lock on ``<path>/.lock`` (created) while the block runs; a second process asking
    for it fails at once, naming the holder's pid, instead of interleaving writes with it."""
    os.makedirs(path, exist_ok=True)
    lock_path = os.path.join(path, ".lock")
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise RunFolderBusy(f"{what} {path} is in use by another process (pid {holder}): wait for it to end, "
                               "or use another folder") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def run_folder(cfg: Any, out_dir: str) -> Iterator[None]:
    """Everything around one run of a script: the multi-host start (``cfg.distributed``), the compilation
    cache (``cfg.compilation_cache``), the run folder locked for this process, ``config.json`` written."""
    if getattr(cfg, "distributed", False):  # declared multi-host: a host without the JAXKD_* variables is refused
        sharding.initialize_distributed(required=True)
    compilation_cache.enable(cfg.compilation_cache)
    # On several hosts sharing a file system, each host holds its own lock file.
    lock_dir = out_dir if jax.process_index() == 0 else os.path.join(out_dir, f"process{jax.process_index()}")
    with folder_lock(lock_dir, "run folder"):
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2, default=str)
        yield


def run_command(argv: list[str] | None, run_experiment: Callable[[Any, str], dict[str, Any]], *, description: str,
                config_type: type, default_config: str | None = None,
                epilogue: Callable[[dict[str, Any]], str] | None = None) -> dict[str, Any]:
    """A script's ``main``: parses the command line, runs ``run_experiment(cfg, out_dir)`` in its run folder,
    prints the table (and ``epilogue(summary)``). SIGTERM ends it with status 143 after its checkpoint;
    errors propagate (:func:`entry_point` turns them into one line)."""
    cfg, out_dir, _ = command_line(argv, description=description, config_type=config_type,
                                   default_config=default_config)
    try:
        with run_folder(cfg, out_dir):
            summary = run_experiment(cfg, out_dir)
    except Preempted as e:
        print(f"\n{e}; re-run the same command with --out {out_dir} to resume", file=sys.stderr)
        raise SystemExit(PREEMPTED_STATUS) from None
    print()
    print(summary["table"])
    if epilogue is not None:
        print(epilogue(summary))
    print(f"run folder: {out_dir}", file=sys.stderr)
    return summary


def entry_point(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Runs ``main(argv)`` as a command: an exception becomes one line on stderr and exit status 2 (a bad
    config, file or argument) or 1 (anything else); ``--debug`` shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:  # noqa: BLE001 - the one place a command turns errors into messages
        if "--debug" in argv:
            raise
        usage = isinstance(e, (ValueError, OSError, TypeError, RunFolderBusy))
        kind = "" if usage else f"{type(e).__name__}: "
        message = " ".join(str(e).split()) or type(e).__name__
        hint = "" if usage else " (re-run with --debug for the traceback)"
        print(f"error: {kind}{message}{hint}", file=sys.stderr)
        raise SystemExit(USAGE_STATUS if usage else 1) from None


# ----- the fit loop -----


def progress_bar(total: int, **kwargs: Any):
    """The experiments' progress bar over ``total`` train steps (tqdm on stderr)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="step", dynamic_ncols=True, mininterval=0.5, **kwargs)


@dataclasses.dataclass
class Evaluation:
    """How a run is scored: ``evaluate(state) -> {metric: value}``, logged as ``<prefix><metric>`` (e.g.
    ``test_accuracy``, ``val_bpb``); ``after(state, result) -> state`` runs after every evaluation (a method
    that reads the validation loss, e.g. DistiLLM's adaptive schedule)."""

    evaluate: Callable[[Any], dict[str, float]]
    prefix: str
    after: Callable[[Any, dict[str, float]], Any] | None = None
    #: The metric shown on the progress bar, and how: ``(metric, format)``.
    progress: tuple[str, str] | None = None


class Runner:
    """Trains runs (a teacher, or a student with one method) resumably, one :meth:`fit` per run; the jitted
    steps are built once and reused across runs and seeds; every run's records go to one ``metrics.jsonl``."""

    def __init__(self, out_dir: str, *, progress, preemption: PreemptionFlag, phases: Phases,
                 eval_every: int, checkpoint_every: int, tensorboard: bool = True, mesh=None,
                 microbatches: int = 1):
        self.out_dir, self.progress, self.preemption, self.phases = out_dir, progress, preemption, phases
        self.eval_every, self.checkpoint_every = eval_every, checkpoint_every
        self.mesh = mesh
        self.train_step = jaxkd.make_train_step(mesh=mesh, microbatches=microbatches)
        # On several hosts, process 0 writes the log; every process takes part in the checkpoints.
        self.log = MetricsLog(out_dir, tensorboard=tensorboard) if jax.process_index() == 0 else None

    def close(self) -> None:
        if self.log is not None:
            self.log.close()

    def fit(self, *, run: str, seed: int, state, loaders: Mapping[str, Any], steps: int, lr_schedule,
            config: dict, evaluation: Evaluation, combine: Callable[[dict], dict] | None = None,
            checkpoint_dir: str | None = None) -> tuple[Any, dict[str, float]]:
        """Trains ``steps`` steps (resuming from the run's checkpoint when there is one), evaluating at step 0,
        every ``eval_every`` and at the end; returns the state and the final evaluation (with ``ms_per_step``,
        the median steady-state step time, when this call ran steps).

        ``loaders``: name -> resumable batch iterator (``get_state``/``set_state``); ``"train"`` is required,
        ``combine({name: batch}) -> batch`` merges the others in (default: the train batch alone). ``config``
        is recorded in the checkpoint: resuming with another is refused, naming what differs. The checkpoint
        goes to ``checkpoint_dir`` (default ``<out_dir>/checkpoints/seed<seed>/<run>``). A step whose loss or
        gradients are not finite raises (:class:`jaxkd.steps.NonFiniteError`): the run stops there.
        """
        if "train" not in loaders:
            raise ValueError(f"loaders must include 'train', got {sorted(loaders)}")
        phases = self.phases
        directory = checkpoint_dir or os.path.join(self.out_dir, "checkpoints", f"seed{seed}", run)
        with phases.phase("checkpoints"):
            ckpt = Checkpointer(directory, max_to_keep=2)
        try:
            with phases.phase("checkpoints"):
                restored = ckpt.restore(state.run_tree(), config=config) if ckpt.steps() else None
            start, damaged = 0, set()
            if restored is not None:
                state = state.with_run_tree(restored.tree)
                start, damaged = restored.step, set(restored.skipped)
                for name, loader in loaders.items():
                    loader.set_state(restored.extra["loaders"][name])
                if restored.skipped:
                    log.warning("run %s seed %d: resuming from step %d; damaged newer steps %s will be rewritten",
                                run, seed, start, sorted(restored.skipped))
                if restored.extra.get("final") is not None:
                    self.progress.update(steps)
                    return state, restored.extra["final"]
                self.progress.update(start)
            with phases.phase("logging"):
                if self.log is not None:
                    self.log.resume(run, seed, start if restored is not None else None)

            def save(step: int, final: dict | None = None) -> None:
                extra = {"loaders": {n: loader.get_state() for n, loader in loaders.items()}, "final": final}
                with phases.phase("checkpoints"):
                    ckpt.save(step, state.run_tree(), extra=extra, config=config, overwrite=step in damaged)

            pending: list[tuple[int, dict]] = []  # device metrics, fetched at eval and save points
            with phases.phase("logging"):
                # The logged learning rate of every step, in one call: evaluating the schedule once per
                # logged step dispatched a handful of eager ops each time (~1 ms a step).
                learning_rates = np.asarray(jax.device_get(lr_schedule(np.arange(steps))), dtype=np.float64)

            def write(record: dict) -> None:
                if self.log is not None:
                    self.log.write({"run": run, "seed": seed, **record})

            def flush() -> None:
                with phases.phase("logging"):
                    for s, m in jax.device_get(pending):
                        write({"step": s, "lr": float(learning_rates[s - 1]), **{k: float(v) for k, v in m.items()}})
                    pending.clear()
                    if self.log is not None:
                        self.log.flush()

            def evaluate(step: int) -> dict[str, float]:
                nonlocal state
                flush()
                with phases.phase("evaluation"):
                    result = evaluation.evaluate(state)
                with phases.phase("logging"):
                    write({"step": step, **{f"{evaluation.prefix}{k}": v for k, v in result.items() if k != "count"}})
                    if self.log is not None:
                        self.log.flush()
                if evaluation.after is not None:
                    state = evaluation.after(state, result)
                if evaluation.progress is not None:
                    metric, fmt = evaluation.progress
                    self.progress.set_postfix({metric: format(result[metric], fmt)})
                return result

            self.progress.set_description(f"{run} seed {seed}")
            result = evaluate(0) if start == 0 else None
            step_seconds: list[float] = []  # steady-state step times (the first step compiles)
            for step in range(start + 1, steps + 1):
                with phases.phase("batches"):
                    batches = {name: next(loader) for name, loader in loaders.items()}
                    batch = combine(batches) if combine is not None else batches["train"]
                began = time.perf_counter()
                with phases.phase("steps"):
                    try:
                        state, metrics = self.train_step(state, batch)  # waits for the step: it reads its status
                    except StepFailedError as e:  # the donated state is gone: only the checkpoint can go on
                        last = ckpt.latest_step()
                        where = f"its checkpoint at step {last}" if last is not None else "its start"
                        raise StepFailedError(f"run {run!r} seed {seed} at step {step}: {e} Re-running the same "
                                              f"command resumes the run from {where}.") from e
                if step > start + 1:
                    step_seconds.append(time.perf_counter() - began)
                pending.append((step, metrics))
                self.progress.update(1)
                if step % self.eval_every == 0 or step == steps:
                    result = evaluate(step)
                if step == steps:
                    break
                if self.preemption.requested:
                    flush()
                    save(step)
                    with phases.phase("checkpoints"):
                        ckpt.wait_until_finished()
                    raise Preempted(run, seed, step)
                if self.checkpoint_every and step % self.checkpoint_every == 0:
                    flush()
                    save(step)
            if step_seconds:  # a run resumed at its last step has no steady-state time of its own
                result = {**result, "ms_per_step": 1000.0 * float(np.median(step_seconds))}
            save(steps, final=result)
            return state, result
        finally:
            with phases.phase("checkpoints"):
                ckpt.close()  # waits for the last asynchronous save
