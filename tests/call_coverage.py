"""A pytest plugin that records which public functions the tests call, and fails a whole-suite run that
never calls one of them.

The functions watched are every function in ``jaxkd.losses.__all__`` and every method factory of the
registry (``jaxkd.methods.REGISTRY``); constants and classes (``TAIDState``, …)
are not functions and are not watched. A call counts when the function's own body is entered, in a test,
a fixture or a test module's import (a loss called inside a method, or traced once by ``jit``, counts):
nothing is declared by hand.

How it records: each watched function's ``__code__`` is swapped for a probe's that records the call,
puts the original code back and runs it. The function object stays the same (every reference to it,
in a registry, a dict or a closure, sees the probe), its signature is kept in ``__signature__`` while the
probe is in place, and after its first call it is exactly the original function again: no cost per call.
(A global ``sys.settrace`` costs 25 % of the LM tests' time on Python 3.11, which runs no specialized
bytecode while a trace function is set.) A decorated loss is probed through the function it wraps
(``per_example_loss`` and its kind share one wrapper's code object, so the wrapper would not say which
loss ran).

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
import threading
import types

import pytest

_OUTPUT_KEY = "jaxkd_called_functions"


def _own_function(fn: types.FunctionType) -> types.FunctionType:
    """The function ``fn`` stands for: through ``__wrapped__``, or through the single closure function of
    the same name (a ``functools.wraps`` decorator that deleted ``__wrapped__``)."""
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
        if not inspect.isfunction(inner):
            return fn
        fn = inner


def watched_functions() -> dict[types.FunctionType, list[str]]:
    """Function -> the public names it implements (``losses.<name>``, ``methods.<registered name>``)."""
    from jaxkd import losses, methods

    watched: dict[types.FunctionType, list[str]] = {}
    for name in losses.__all__:
        fn = getattr(losses, name)
        if inspect.isfunction(fn):
            watched.setdefault(_own_function(fn), []).append(f"losses.{name}")
    for name, entry in methods.REGISTRY.items():
        watched.setdefault(_own_function(entry.factory), []).append(f"methods.{name}")
    return watched


def _probe_code(key: int, freevars: tuple[str, ...]) -> types.CodeType:
    """``def probe(*args, **kwargs): return first_call(key, args, kwargs)``, with the original's free
    variables (a function's ``__code__`` must keep its closure's size; the probe never reads them)."""
    names = ", ".join(freevars)
    keep_free = f"        ({names},) if kwargs is None else None\n" if freevars else ""
    source = (f"def outer({names}):\n"
              f"    def probe(*args, **kwargs):\n{keep_free}"
              f"        return __import__('sys').modules[{__name__!r}].first_call({key}, args, kwargs)\n"
              f"    return probe\n")
    namespace: dict = {}
    exec(compile(source, __file__, "exec"), namespace)
    code = namespace["outer"](*[None] * len(freevars)).__code__
    assert code.co_freevars == freevars, (code.co_freevars, freevars)
    return code


_lock = threading.Lock()
_functions: dict[int, types.FunctionType] = {}  # key -> watched function
_probed: dict[int, tuple[types.CodeType, bool, list[str]]] = {}  # key -> (its code, had __signature__, names)
called: set[str] = set()


def _restore(fn: types.FunctionType, code: types.CodeType, had_signature: bool) -> None:
    fn.__code__ = code
    if not had_signature:
        del fn.__signature__


def first_call(key: int, args, kwargs):
    """The probe of function ``key`` ran: record its names, restore its code, run it."""
    with _lock:
        entry = _probed.pop(key, None)  # None: another thread restored it a moment ago
        if entry is not None:
            code, had_signature, names = entry
            _restore(_functions[key], code, had_signature)
            called.update(names)
    return _functions[key](*args, **kwargs)


def probe(watched: dict[types.FunctionType, list[str]]) -> None:
    """Swaps each watched function's code for a probe (see the module docstring)."""
    with _lock:
        for fn, names in watched.items():
            key = id(fn)
            had_signature = "__signature__" in fn.__dict__
            if not had_signature:
                fn.__signature__ = inspect.signature(fn)
            _functions[key] = fn
            _probed[key] = (fn.__code__, had_signature, names)
            fn.__code__ = _probe_code(key, fn.__code__.co_freevars)


def unprobe(functions=None) -> None:
    """Puts back the code of the given functions (default: all) that were not called yet."""
    with _lock:
        keys = list(_probed) if functions is None else [id(fn) for fn in functions if id(fn) in _probed]
        for key in keys:
            code, had_signature, _ = _probed.pop(key)
            _restore(_functions[key], code, had_signature)


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
        self.recording = not self.is_controller and os.environ.get("JAXKD_CALL_COVERAGE") != "0"
        self.uncalled: list[str] = []
        if self.recording:  # this process runs tests
            probe(self.watched)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error):
        self.called.update(getattr(node, "workeroutput", {}).get(_OUTPUT_KEY, ()))

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session, exitstatus):
        if self.recording:
            unprobe()
            self.called |= called
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
