"""What a resumable experiment writes as it goes: ``metrics.jsonl``, TensorBoard events, preemption.

A run that is killed and re-run resumes from its newest intact checkpoint at step ``k``; everything it
logged after ``k`` is logged again by the resumed run. :meth:`MetricsLog.resume` therefore drops the
records of that run past ``k`` (and a torn last line of a killed write) before the run appends, so the
file holds every record exactly once. TensorBoard events are written by tensorboardX's standard
``SummaryWriter`` (event files without TensorFlow); a resumed writer purges its events past ``k``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from typing import Any, Mapping


log = logging.getLogger("jaxkd.experiment")


def read_records(path: str) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``: every line that is a JSON object with ``run``, ``seed`` and
    ``step``. Other lines (a write torn by a kill, a stray line written by hand) are skipped with one
    warning naming how many and the first, so neither a resume nor a plot stops on them."""
    records, skipped = [], []
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict) and {"run", "seed", "step"} <= record.keys():
                records.append(record)
            elif line.strip():
                skipped.append(number)
    if skipped:
        log.warning("%s: skipped %d line(s) that are not metrics records (first: line %d)", path, len(skipped),
                    skipped[0])
    return records


class MetricsLog:
    """``metrics.jsonl`` (one JSON record per train step and per evaluation) plus TensorBoard event files
    under ``tensorboard/seed<seed>/<run>/``.

    Records of a run hold ``run``, ``seed`` and ``step``; records at a step are written (and flushed) before
    the checkpoint of that step is saved, so a checkpoint never claims steps the log lacks.
    """

    def __init__(self, out_dir: str, *, tensorboard: bool = True):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.tensorboard_dir = os.path.join(out_dir, "tensorboard") if tensorboard else None
        self._file = open(self.path, "a")
        self._writers: dict[tuple[str, int], Any] = {}

    def resume(self, run: str, seed: int, step: int | None) -> None:
        """Keeps ``(run, seed)``'s records up to ``step`` (none when ``step`` is None: a fresh start) and
        every other record; drops lines that are not records (:func:`read_records`). Rewritten atomically."""
        self._file.close()
        kept = []
        for record in read_records(self.path):
            if record["run"] == run and record["seed"] == seed:
                if step is None or record["step"] > step:
                    continue
            kept.append(json.dumps(record) + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")
        if self.tensorboard_dir is not None:
            self._close_writer(run, seed)
            self._writer(run, seed, purge_step=(step or 0) + 1)

    def write(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(dict(record)) + "\n")
        if self.tensorboard_dir is not None:
            writer = self._writer(record["run"], record["seed"])
            for key, value in record.items():
                if key not in ("run", "seed", "step") and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, global_step=record["step"])

    def flush(self) -> None:
        self._file.flush()
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        self.flush()
        self._file.close()
        for key in list(self._writers):
            self._close_writer(*key)

    def _writer(self, run: str, seed: int, purge_step: int | None = None):
        key = (run, seed)
        if key not in self._writers:
            from tensorboardX import SummaryWriter  # imported on use: the library never needs it

            logdir = os.path.join(self.tensorboard_dir, f"seed{seed}", run.replace("/", "_"))
            self._writers[key] = SummaryWriter(logdir=logdir, purge_step=purge_step)
        return self._writers[key]

    def _close_writer(self, run: str, seed: int) -> None:
        writer = self._writers.pop((run, seed), None)
        if writer is not None:
            writer.close()


class Preempted(Exception):
    """SIGTERM arrived: the run saved a checkpoint at ``step`` and stopped; re-running resumes it."""

    def __init__(self, run: str, seed: int, step: int):
        super().__init__(f"preempted (SIGTERM) in run {run!r} seed {seed} at step {step}: checkpoint saved")
        self.run, self.seed, self.step = run, seed, step


class PreemptionFlag:
    """Set by SIGTERM (the signal a scheduler sends before preempting a job); the train loop polls it after
    each step, saves a checkpoint and raises :class:`Preempted`. The previous handler is restored on exit."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "PreemptionFlag":
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)
