"""Where an experiment's time goes: wall time by phase, with the time spent making executables (tracing,
lowering, compiling or loading from the persistent cache) taken out of every phase and shown on its own."""

from __future__ import annotations

import contextlib
import time
from collections import Counter

from jaxkd import compilation_cache

#: The phases, in the order of the printed breakdown (``compile`` and ``other`` are computed):
#: ``data`` loading the data set, ``setup`` model initialization and train states, ``batches`` the input
#: pipeline handing the steps their batches, ``steps`` the train steps, ``evaluation`` test-set scoring,
#: ``logging`` fetching and writing metrics, ``checkpoints`` saving/restoring runs and teachers, ``report``
#: the results table and learning curves.
PHASES = ("data", "setup", "batches", "steps", "evaluation", "logging", "checkpoints", "report")


class Phases:
    """Accumulates wall time per phase: ``with phases.phase("steps"): ...``. Phases must not nest."""

    def __init__(self) -> None:
        compilation_cache.track()
        self.active: str | None = None
        self.seconds: Counter = Counter()
        self.started = time.perf_counter()
        self.compile_at_start = compilation_cache.compile_seconds()

    @contextlib.contextmanager
    def phase(self, name: str):
        if name not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {name!r}")
        if self.active is not None:  # nested phases would count the same seconds twice
            raise RuntimeError(f"phase {name!r} entered inside phase {self.active!r}")
        self.active = name
        compile_before, start = compilation_cache.compile_seconds(), time.perf_counter()
        try:
            yield
        finally:
            compiling = compilation_cache.compile_seconds() - compile_before
            self.seconds[name] += time.perf_counter() - start - compiling
            self.active = None

    def breakdown(self) -> dict[str, float]:
        """Seconds per phase, ``compile``, ``other`` (the rest of the wall time since creation) and ``total``."""
        total = time.perf_counter() - self.started
        out = {name: float(self.seconds[name]) for name in PHASES}
        out["compile"] = compilation_cache.compile_seconds() - self.compile_at_start  # in phases or not
        out["other"] = max(total - sum(out.values()), 0.0)
        out["total"] = total
        return out


def describe(breakdown: dict[str, float]) -> str:
    """``"data 3 s, setup 1 s, ..., compile 40 s, other 2 s"`` (every phase, in order)."""
    return ", ".join(f"{name} {breakdown[name]:.0f} s" for name in (*PHASES, "compile", "other"))
