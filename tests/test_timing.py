"""experiments.timing: seconds by phase, compiling counted on its own, the rest as "other"."""

import time

import jax
import jax.numpy as jnp
import pytest

from experiments.timing import PHASES, Phases, describe


def test_phases_split_the_wall_time_and_take_compiling_out():
    phases = Phases()
    with phases.phase("batches"):
        time.sleep(0.05)
    with phases.phase("steps"):
        # A fresh program: its tracing and compiling go to "compile", the run to "steps".
        jax.jit(lambda x: jnp.sin(x) * 3.0 + 0.25)(jnp.arange(7.0)).block_until_ready()
        time.sleep(0.05)
    time.sleep(0.05)  # outside every phase
    out = phases.breakdown()
    assert out["batches"] >= 0.05 and out["steps"] >= 0.05
    assert out["compile"] > 0
    assert out["other"] >= 0.05
    assert sum(out[name] for name in (*PHASES, "compile", "other")) == pytest.approx(out["total"])
    assert describe(out).startswith("data 0 s, setup 0 s, batches 0 s, steps 0 s")


def test_phases_refuse_unknown_and_nested_phases():
    phases = Phases()
    with pytest.raises(ValueError, match="phase must be one of"):
        with phases.phase("training"):
            pass
    with pytest.raises(RuntimeError, match="inside phase 'steps'"):
        with phases.phase("steps"):
            with phases.phase("logging"):
                pass
    with phases.phase("logging"):  # the failed nesting left no phase open
        pass
