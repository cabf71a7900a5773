"""JAX's persistent compilation cache for scripts: a second run loads what the first one compiled.

XLA compiles every distinct program once per process; a short experiment on CPU spends much of its time
there. JAX can keep compiled executables on disk (``jax_compilation_cache_dir``) and load them in later
processes whose program, shapes, flags, JAX version and devices are the same. :func:`enable` turns it on
for every program (no minimum compile time or size, so a repeated run compiles nothing it compiled
before); :func:`compile_counts` tells how many programs were compiled and how many were loaded, and
:func:`compile_seconds` the wall time spent tracing, lowering and compiling (or loading) them.

This is process-wide state, so the library never calls it on import: the experiment scripts do, with a
directory the user chooses (their ``--set compilation_cache=...``; ``None`` turns it off). Benchmarks that
report compile times leave it off, or they would time the cache. The default directory is ``$JAXKD_COMPILATION_CACHE`` when set (empty: off), else
``~/.cache/jaxkd/xla``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter

import jax

__all__ = ["DEFAULT", "compile_counts", "compile_seconds", "default_directory", "enable", "track"]

#: A config value meaning "the default directory" (:func:`default_directory`).
DEFAULT = "default"

_ENV = "JAXKD_COMPILATION_CACHE"
_counts: Counter = Counter()
_spans: list[tuple[float, float]] = []
_lock = threading.Lock()
_listening = False
_warned: set[str] = set()  # folders already reported as unusable (one warning each per process)
log = logging.getLogger("jaxkd.compilation_cache")

# JAX's monitoring events: one per compilation that consulted the persistent cache, one per executable
# loaded from it (the others were compiled, then written).
_EVENTS = {
    "/jax/compilation_cache/compile_requests_use_cache": "requests",
    "/jax/compilation_cache/cache_hits": "loaded",
}
# The three stages of making an executable (jax._src.dispatch): tracing to a jaxpr, lowering to MLIR, and
# XLA's compile or the persistent cache's load. Their time spans may nest (a jit traced inside another).
_COMPILE_SPANS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


def default_directory() -> str | None:
    """``$JAXKD_COMPILATION_CACHE`` when set (``""``: no cache), else ``~/.cache/jaxkd/xla``."""
    value = os.environ.get(_ENV)
    if value is not None:
        return value or None
    return os.path.join(os.path.expanduser("~"), ".cache", "jaxkd", "xla")


def track() -> None:
    """Starts counting compilations and their time in this process (:func:`compile_counts`,
    :func:`compile_seconds`); :func:`enable` calls it. Idempotent."""
    global _listening
    with _lock:
        if _listening:
            return
        _listening = True

    def on_event(event: str, **kwargs) -> None:
        name = _EVENTS.get(event)
        if name is not None:
            with _lock:
                _counts[name] += 1

    def on_span(event: str, start: float, end: float, **kwargs) -> None:
        if event in _COMPILE_SPANS:
            with _lock:
                _spans.append((start, end))

    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_time_span_listener(on_span)


def enable(directory: str | None = DEFAULT) -> str | None:
    """Caches every compiled program in ``directory`` (created if needed) and loads it from there in later
    processes. ``DEFAULT``: :func:`default_directory`; ``None``: leaves the cache off. Returns the absolute
    directory used, or ``None``.

    A folder that cannot be created or written (a read-only home, a path under a file) is not worth
    aborting a run for, since the cache only saves compile time: a warning names it (once per process)
    and ``None`` is returned, the cache left off.

    Raises:
        ValueError: ``directory`` exists and is not a folder.
    """
    if directory == DEFAULT:
        directory = default_directory()
    if directory is None:
        return None
    directory = os.path.abspath(os.path.expanduser(str(directory)))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"compilation cache {directory!r} exists and is not a folder")
    try:
        os.makedirs(directory, exist_ok=True)
        writable = os.access(directory, os.W_OK | os.X_OK)
        why = "" if writable else "it is not writable"
    except OSError as e:
        writable, why = False, f"it cannot be created: {e.strerror or e}"
    if not writable:
        if directory not in _warned:
            _warned.add(directory)
            log.warning("compilation cache %r is unusable (%s); running without the cache (every program "
                        "is compiled)", directory, why)
        return None
    jax.config.update("jax_compilation_cache_dir", directory)
    # Every program, however quick to compile or small: the point is that a re-run compiles nothing.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    track()
    return directory


def compile_counts() -> dict[str, int]:
    """Programs this process ``compiled`` and ``loaded`` from the persistent cache since :func:`track`
    (JAX's cache events: only compilations that consult the cache are counted)."""
    with _lock:
        return {"compiled": _counts["requests"] - _counts["loaded"], "loaded": _counts["loaded"]}


def compile_seconds() -> float:
    """Wall time this process spent making executables since :func:`track` (tracing, lowering, compiling
    or loading from the cache): the union of those stages' time spans, so nested ones count once."""
    with _lock:
        spans = sorted(_spans)
    total, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            total += b - max(a, end)
            end = b
    return total
