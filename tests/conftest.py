"""Test-wide setup.

* Eight simulated CPU devices so the sharding tests have a mesh to split over; the flag must be set
  before jax is imported anywhere.
* XLA's backend optimizations off (``--xla_backend_optimization_level=0``): the tests run tiny programs
  once, so compiling is what they cost, and unoptimized compiles take about half the time (measured on
  the registry test). Values are unaffected beyond float rounding, which every check tolerates; programs
  compared bitwise (resume, multi-host) run under the same flags, subprocesses included (they inherit
  ``XLA_FLAGS``). Timings are measured in benchmarks/, never here.
* The suite runs on 2 processes (pytest-xdist, ``-n 2`` in pyproject's addopts): single-threaded
  compiles fill both cores.
* Hypothesis is derandomized (a fixed seed derived from each test), so the suite is reproducible in
  CI and in every fresh environment. Explore new examples locally with ``HYPOTHESIS_PROFILE=explore``.
"""

import os

_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("MPLBACKEND", "Agg")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
