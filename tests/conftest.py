"""Test-wide setup.

* Eight simulated CPU devices so the sharding tests have a mesh to split over; the flag must be set
  before jax is imported anywhere.
* XLA's backend optimizations off (``--xla_backend_optimization_level=0``) and its older element-wise
  emitters instead of the MLIR fusion emitters (``--xla_cpu_use_fusion_emitters=false``): the tests run
  tiny programs once, so compiling is what they cost. Unoptimized compiles take about half the time
  (measured on the registry test); the older emitters halve it again (three LM and two CNN train steps:
  13.6 s -> 7.2 s and 12.4 s -> 7.6 s). Values are unaffected beyond float rounding, which every check
  tolerates; programs compared bitwise (resume, multi-host) run under the same flags, subprocesses
  included (they inherit ``XLA_FLAGS``). Timings are measured in benchmarks/, never here.
* The suite runs on 2 processes (pytest-xdist, ``-n 2`` in pyproject's addopts): single-threaded
  compiles fill both cores.
* A persistent compilation cache shared by the run's processes (below): a program compiled by one test
  is loaded, not compiled again, by the next that builds the very same program.
* Hypothesis is derandomized (a fixed seed derived from each test), so the suite is reproducible in
  CI and in every fresh environment. Explore new examples locally with ``HYPOTHESIS_PROFILE=explore``.
"""

import os

_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# JAXKD_TEST_XLA_DEFAULTS=1 keeps XLA's default optimization and emitters: CI runs a few files that way
# (.ci/run), so the programs users compile are tested too, not only the fast-compiling ones.
if os.environ.get("JAXKD_TEST_XLA_DEFAULTS") != "1":
    for _flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
        if _flag.split("=")[0] not in _flags:  # a flag the caller set wins
            _flags += " " + _flag
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("MPLBACKEND", "Agg")
# The experiment scripts' default cache (~/.cache/jaxkd/xla) is off: a run of the suite writes nothing into
# the user's home, and a test that wants a cache names its own folder (jaxkd.compilation_cache).
os.environ["JAXKD_COMPILATION_CACHE"] = ""
# One persistent compilation cache for this run of the suite, shared by its processes (the xdist workers
# inherit the folder from the controller, which removes it at exit; subprocesses inherit the variables):
# a program another test already compiled (the same HLO, flags and devices: the same key) is loaded instead
# of compiled again, e.g. the tiny experiments several tests run, and every process of a resume test.
# The registry, roles, experiment and LM train files: 127 s -> 110 s.
if "JAXKD_TEST_XLA_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAXKD_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="jaxkd-test-xla-")
    atexit.register(shutil.rmtree, os.environ["JAXKD_TEST_XLA_CACHE"], ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["JAXKD_TEST_XLA_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    # Which public losses and method factories the tests call, recorded per process and checked at the
    # end of a whole-suite run (tests/call_coverage.py).
    from tests.call_coverage import CallCoveragePlugin

    config.pluginmanager.register(CallCoveragePlugin(config), "jaxkd-call-coverage")
