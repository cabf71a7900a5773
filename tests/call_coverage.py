"""A pytest plugin that records which public functions the tests call, and fails a whole-suite run that
never calls one of them.

The functions watched are every function in ``jaxkd.losses.__all__`` and every method factory of the
registry (``jaxkd.methods.REGISTRY``); constants and classes (``TAIDState``, ``TOKEN_NORMALIZER_KEY``, …)
are not functions and are not watched. A call counts when the function's own body starts running, in a
test, a fixture or a test module's import (a loss called inside a method, or traced once by ``jit``,
counts): nothing is declared by hand.

How it records: a global trace function (``sys.settrace``; Python 3.11 has no ``sys.monitoring``) that
looks each new frame's code object up in a dict of the watched ones, removes a code object the first time
it runs and turns itself off once all have run. It returns ``None``, so no frame is traced line by line:
the cost is one dict lookup per Python call until everything has been seen. A decorated loss is watched
through the function it wraps (``per_example_loss`` and its kind share one wrapper's code object, so the
wrapper's own code would say nothing about which loss ran).

Under pytest-xdist each worker records and hands its set to the controller through ``workeroutput``; the
controller merges them. The check runs only for the whole default suite (``pytest`` or ``pytest tests``,
marker expression ``not slow`` or none, no ``-k``/``--deselect``/``--lf``, not stopped early): a subset of
files leaves most functions uncalled by design. ``JAXKD_CALL_COVERAGE=1`` forces the check on a subset,
``=0`` turns recording and check off.
"""

from __future__ import annotations

import inspect
import os
import pathlib
import sys
import threading
import types

import pytest

_OUTPUT_KEY = "jaxkd_called_functions"


def _own_code(fn) -> types.CodeType:
    """The code object of the function ``fn`` stands for: through ``__wrapped__``, or through the single
    closure function of the same name (a ``functools.wraps`` decorator that deleted ``__wrapped__``)."""
    while True:
        inner = getattr(fn, "__wrapped__", None)
        if inner is None:
            same_name = []
            for cell in fn.__closure__ or ():
                try:
                    content = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                if inspect.isfunction(content) and content.__name__ == fn.__name__:
                    same_name.append(content)
            inner = same_name[0] if len(same_name) == 1 else None
        if inner is None:
            return fn.__code__
        fn = inner


def watched_functions() -> dict[types.CodeType, list[str]]:
    """Code object -> the public names it implements (``losses.<name>``, ``methods.<registered name>``)."""
    from jaxkd import losses, methods

    watched: dict[types.CodeType, list[str]] = {}
    for name in losses.__all__:
        fn = getattr(losses, name)
        if inspect.isfunction(fn):
            watched.setdefault(_own_code(fn), []).append(f"losses.{name}")
    for name, entry in methods.REGISTRY.items():
        watched.setdefault(_own_code(entry.factory), []).append(f"methods.{name}")
    return watched


class CallRecorder:
    """Records the watched functions whose body ran, from :meth:`start` until they all have."""

    def __init__(self, watched: dict[types.CodeType, list[str]]):
        self._waiting = dict(watched)
        self.called: set[str] = set()

    def _trace(self, frame, event, arg):
        names = self._waiting.pop(frame.f_code, None)
        if names is not None:
            self.called.update(names)
            if not self._waiting:
                sys.settrace(None)
                threading.settrace(None)
        return None  # never trace inside the frame

    def start(self) -> None:
        sys.settrace(self._trace)
        threading.settrace(self._trace)

    def stop(self) -> None:
        if sys.gettrace() == self._trace:
            sys.settrace(None)
        threading.settrace(None)


def _is_whole_suite(session: pytest.Session) -> bool:
    forced = os.environ.get("JAXKD_CALL_COVERAGE")
    if forced in ("0", "1"):
        return forced == "1"
    config, option = session.config, session.config.option
    if session.shouldstop or session.shouldfail:
        return False
    if option.keyword or getattr(option, "deselect", None) or getattr(option, "lf", False):
        return False
    if (option.markexpr or "").strip() not in ("", "not slow"):
        return False
    tests_dir = config.rootpath / "tests"
    for arg in config.args:
        path = pathlib.Path(arg.split("::")[0])
        path = (path if path.is_absolute() else config.invocation_params.dir / path).resolve()
        if "::" in arg or path not in (tests_dir, config.rootpath):
            return False
    return True


class CallCoveragePlugin:
    def __init__(self, config: pytest.Config):
        self.config = config
        self.is_worker = hasattr(config, "workerinput")
        self.is_controller = not self.is_worker and bool(config.getoption("numprocesses", None)
                                                         or config.getoption("tx", None))
        self.watched = watched_functions()
        self.called: set[str] = set()
        self.recorder = None
        self.uncalled: list[str] = []
        if not self.is_controller and os.environ.get("JAXKD_CALL_COVERAGE") != "0":  # this process runs tests
            self.recorder = CallRecorder(self.watched)
            self.recorder.start()

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error):
        self.called.update(getattr(node, "workeroutput", {}).get(_OUTPUT_KEY, ()))

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session, exitstatus):
        if self.recorder is not None:
            self.recorder.stop()
            self.called |= self.recorder.called
        if self.is_worker:
            self.config.workeroutput[_OUTPUT_KEY] = sorted(self.called)
            return
        if exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) or not _is_whole_suite(session):
            return
        public = {name for names in self.watched.values() for name in names}
        self.uncalled = sorted(public - self.called)
        if self.uncalled:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        if self.uncalled:
            terminalreporter.section("public functions no test called", red=True)
            terminalreporter.line(f"{len(self.uncalled)} public functions were never called by any test "
                                  "(tests/call_coverage.py):")
            for name in self.uncalled:
                terminalreporter.line(f"  {name}")
