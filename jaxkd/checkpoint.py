"""Orbax checkpoints that cannot lie: each step carries a manifest, and restore checks it.

Why: with Orbax alone, a save into an existing step is skipped without a word. 400 flipped bytes
restore as wrong optimizer values. A truncated file gives a TensorStore dump instead of the older,
intact step. Here each step ``directory/<step>/`` holds three Orbax items:

* ``state``: the pytree's arrays, through ``StandardSave``. A state sharded over one mesh restores
  onto another because the target's shardings decide where the arrays land.
* ``manifest`` (JSON): for each leaf its keypath, shape, dtype and the sha256 of its bytes (C order,
  from host copies taken inside ``save``), the run's ``config`` and the sha256 of ``extra``.
* ``extra`` (JSON, optional): what the run needs besides the arrays, such as the data iterator's
  position or the results so far.

Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it only after every item is on
disk. On object stores it writes ``commit_success.txt`` instead. Steps that were never finalized are
not listed, so a write cut off by a killed process is never picked. The manifest is written with the
other items, so a listed step without one was not written by this module; it counts as damaged.

Plain pytrees only (dicts, flax.struct dataclasses, optax states of jax/numpy arrays and scalars).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

PyTree = Any
FORMAT = "jaxkd.checkpoint/1"
log = logging.getLogger("jaxkd.checkpoint")
_MISSING = object()


class CheckpointError(ValueError):
    """Nothing intact to restore. ``reasons`` maps each step that was tried to why it was refused."""

    def __init__(self, directory: str, reasons: Mapping[int, str]):
        self.reasons = dict(reasons)
        why = "; ".join(f"step {s}: {r}" for s, r in self.reasons.items())
        super().__init__(f"no intact checkpoint in {directory}: {why}")


class _Damaged(Exception):
    """A step that cannot be trusted (unreadable, incomplete or failing its checksums): the caller may fall back."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """What :meth:`Checkpointer.restore` found. It unpacks as ``tree, extra = ckpt.restore(target)``.

    ``step`` is the step that was restored. ``skipped`` maps each newer step refused as damaged to the
    reason. ``config`` is the config saved with the step, and ``fingerprint`` is :func:`fingerprint`
    of ``tree`` (taken from the manifest after every leaf was checked against it).
    """

    tree: PyTree
    extra: dict[str, Any] | None
    step: int
    config: dict[str, Any] | None
    fingerprint: dict[str, Any]
    skipped: dict[int, str]

    def __iter__(self):
        return iter((self.tree, self.extra))


# ----- leaves, checksums, fingerprints -----

def _leaves(tree: PyTree) -> list[tuple[str, Any]]:
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _shape_dtype(x) -> tuple[list[int], str]:
    """Python scalars have no dtype of their own: they get NumPy's, on saving and on restoring alike."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        x = np.asarray(x)
    return list(map(int, x.shape)), str(x.dtype)


def _spec(leaf: Mapping[str, Any]) -> str:
    """``float32[3, 4]``, for messages."""
    return f"{leaf['dtype']}{leaf['shape']}"


def _host(values: list) -> list[np.ndarray]:
    """Host copies in C order, all taken before returning. Donated buffers can't change them afterwards.

    Typed PRNG keys are copied as their key data. Arrays that live partly on other processes are
    gathered, so every process hashes the same global values.
    """
    values = [jax.random.key_data(x) if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)
              else x for x in values]
    remote = [i for i, x in enumerate(values) if isinstance(x, jax.Array) and not x.is_fully_addressable]
    if remote:  # one collective for all of them; every process calls save/restore in the same order
        gathered = multihost_utils.process_allgather([values[i] for i in remote], tiled=True)
        for i, array in zip(remote, gathered):
            values[i] = array
    return [np.ascontiguousarray(a) for a in jax.device_get(values)]


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest()


def _layout(tree: PyTree) -> list[dict[str, Any]]:
    return [dict(zip(("path", "shape", "dtype"), (p, *_shape_dtype(x)))) for p, x in _leaves(tree)]


def _describe(tree: PyTree) -> list[dict[str, Any]]:
    """The manifest's record of each leaf: keypath, shape, dtype and the sha256 of its bytes."""
    hosts = _host([x for _, x in _leaves(tree)])
    return [{**leaf, "sha256": _sha256(h)} for leaf, h in zip(_layout(tree), hosts)]


def _fingerprint_of(described: list[dict[str, Any]]) -> dict[str, Any]:
    total = hashlib.sha256("".join(d["sha256"] for d in described).encode()).hexdigest()
    return {"leaves": [{k: d[k] for k in ("path", "shape", "dtype")} for d in described], "sha256": total}


def fingerprint(tree: PyTree) -> dict[str, Any]:
    """Each leaf's keypath, shape and dtype, and one sha256 over all the values (JSON-ready).

    It names a frozen teacher: put it in a run's ``config``, and a checkpoint restored with another
    teacher is refused as a config mismatch.
    """
    return _fingerprint_of(_describe(tree))


def check_fingerprint(expected: Mapping[str, Any], actual: Mapping[str, Any], *, who: str = "variables") -> None:
    """Raises ``ValueError`` saying how ``actual`` differs: structure first, then shapes/dtypes, then values."""
    want = {leaf["path"]: _spec(leaf) for leaf in expected["leaves"]}
    got = {leaf["path"]: _spec(leaf) for leaf in actual["leaves"]}
    if list(want) != list(got):
        missing, unexpected = [p for p in want if p not in got], [p for p in got if p not in want]
        raise ValueError(f"{who} differ in structure: missing {missing[:5]}, unexpected {unexpected[:5]}"
                         + ("" if missing or unexpected else " (same leaves, different order)"))
    for path, spec in want.items():
        if got[path] != spec:
            raise ValueError(f"{who} differ at {path}: {got[path]}, expected {spec}")
    if expected["sha256"] != actual["sha256"]:
        raise ValueError(f"{who} differ in values (same structure, shapes and dtypes): sha256 "
                         f"{actual['sha256'][:16]}..., expected {expected['sha256'][:16]}...")


# ----- JSON items and config comparison -----

def _json(value: Any, what: str) -> Any:
    """``value`` as it will read back from JSON (tuples become lists, ...), so comparisons and checksums agree."""
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serializable: {e}") from None


def _json_sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
    if not items:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_differences(saved: Mapping[str, Any] | None, given: Mapping[str, Any]) -> list[str]:
    """Each differing key as a dotted path (list items by index), with both values."""
    old, new = _flatten(_json(saved or {}, "config")), _flatten(_json(given, "config"))

    def same(a, b):
        return a == b and isinstance(a, bool) == isinstance(b, bool)

    def show(v):
        return "<missing>" if v is _MISSING else json.dumps(v)

    return [f"{k}: checkpoint has {show(old.get(k, _MISSING))}, given {show(new.get(k, _MISSING))}"
            for k in sorted(set(old) | set(new)) if not same(old.get(k, _MISSING), new.get(k, _MISSING))]


# ----- restore helpers -----

def _tree_mismatch(saved: list[dict[str, Any]], target: PyTree) -> str | None:
    """The first keypath where the checkpoint and the target disagree, with both shapes/dtypes."""
    have = {d["path"]: _spec(d) for d in saved}
    want = {d["path"]: _spec(d) for d in _layout(target)}
    for path, spec in want.items():
        if path not in have:
            return f"{path} ({spec}) is missing in checkpoint"
        if have[path] != spec:
            return f"{path}: checkpoint has {have[path]}, target has {spec}"
    for path, spec in have.items():
        if path not in want:
            return f"{path} ({spec}) in checkpoint is not in target"
    return None


def _abstract(target: PyTree) -> PyTree:
    """Where Orbax puts each array: on the target leaf's sharding, so a checkpoint restores onto any mesh.

    A ``ShapeDtypeStruct`` without a sharding (from ``jax.eval_shape``) goes to the first local
    device. NumPy and Python leaves come back as such.
    """
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(x):
        if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or default)
        return x

    return jax.tree.map(leaf, target)


def _short(exc: BaseException) -> str:
    """One line from the root cause, ~200 characters. Orbax wraps TensorStore errors in a spec dump."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    return text if len(text) <= 200 else text[:197] + "..."


def _ensure_writable(directory: str) -> None:
    """Fail at construction, naming the directory, not at the first asynchronous save."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except PermissionError as e:
        raise PermissionError(f"checkpoint directory {directory} is not writable: {e.strerror}") from None
    except OSError as e:
        raise ValueError(f"checkpoint directory {directory} cannot be created or written: {e}") from None


# ----- the checkpointer -----

class Checkpointer:
    """Saves and restores ``(pytree, extra)`` under ``directory/<step>/``. Saves are asynchronous.

    Args:
      directory: where checkpoints live. It is made absolute, as Orbax requires. Unless ``read_only``,
        it is created and checked for writing here.
      max_to_keep: how many recent steps Orbax keeps (``None`` keeps all).
      read_only: open an existing directory only to restore, e.g. a teacher someone else trained.

    ``save`` returns once the arrays are copied to the host and hashed, while Orbax writes in the
    background. ``wait_until_finished()`` and ``close()`` (also on leaving a ``with`` block) wait for
    the write; ``restore`` waits too.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, read_only: bool = False):
        self.directory = os.path.abspath(os.fspath(directory))
        self.read_only = read_only
        if not read_only:
            _ensure_writable(self.directory)
        options = ocp.CheckpointManagerOptions(  # read_only: Orbax warns unless nothing asks to save or delete
            max_to_keep=None if read_only else max_to_keep, save_interval_steps=0 if read_only else 1,
            create=not read_only, read_only=read_only, enable_async_checkpointing=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """Steps on disk or being written, oldest first. They may be damaged; ``restore`` checks."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest step on disk or being written (maybe damaged: ``Restored.step`` says what was used)."""
        return self._manager.latest_step()

    def save(self, step: int, tree: PyTree, *, extra: Mapping[str, Any] | None = None,
             config: Mapping[str, Any] | None = None, overwrite: bool = False) -> dict[str, Any]:
        """Starts writing ``tree`` (and the JSON dict ``extra``) as ``step``, and returns its :func:`fingerprint`.

        A save either writes or raises, never silently does nothing. A ``step`` not after the latest
        existing one raises ``ValueError``. ``overwrite=True`` first deletes that step and every newer
        one, so the run's history goes on from here, e.g. after ``restore`` fell back past damaged
        steps (``Restored.skipped``). ``config`` (JSON: method, models, optimizer, data...) is
        recorded so that ``restore(config=...)`` can refuse a run set up differently.
        """
        if self.read_only:
            raise ValueError(f"cannot save step {step}: {self.directory} was opened read_only")
        step = int(step)
        taken = [s for s in self.steps() if s >= step]
        if taken and not overwrite:
            raise ValueError(f"cannot save step {step} in {self.directory}: it is not after the latest existing "
                             f"step {taken[-1]}; overwrite=True deletes steps {taken} and writes step {step}")
        config = None if config is None else _json(config, "config")
        extra = None if extra is None else _json(dict(extra), "extra")
        described = _describe(tree)
        manifest = {"format": FORMAT, "leaves": described, "config": config,
                    "extra_sha256": None if extra is None else _json_sha256(extra)}
        items = {"state": ocp.args.StandardSave(tree), "manifest": ocp.args.JsonSave(manifest)}
        if extra is not None:
            items["extra"] = ocp.args.JsonSave(extra)
        if taken:  # only now that the new step is ready to be written
            self._manager.wait_until_finished()
            for s in taken:
                self._manager.delete(s)
        if not self._manager.save(step, args=ocp.args.Composite(**items), force=True):
            raise RuntimeError(f"Orbax declined to save step {step} in {self.directory}")
        return _fingerprint_of(described)

    def manifest(self, step: int) -> dict[str, Any]:
        """The manifest of ``step`` (leaves, config...) without reading any array; ``CheckpointError`` if damaged."""
        self._manager.wait_until_finished()
        try:
            return self._manifest(step)
        except _Damaged as e:
            raise CheckpointError(self.directory, {step: str(e)}) from None

    def restore(self, target: PyTree, *, step: int | None = None,
                config: Mapping[str, Any] | None = None) -> Restored:
        """Restores the newest intact step (or exactly ``step``) into ``target``'s structure and shardings.

        ``target`` may hold arrays or ``jax.ShapeDtypeStruct``s, and their shardings decide where the
        restored arrays land. A step is damaged if it can't be read, misses an item or its manifest,
        or fails a checksum. Without ``step``, a damaged step is logged as a warning (logger
        ``jaxkd.checkpoint``) and the next older one is tried. ``CheckpointError`` lists every step
        and why when none is intact. With ``step``, damage raises at once. These are mistakes, not
        damage, and raise ``ValueError`` with no fallback: a ``config`` that differs from the saved
        one (each differing key named) and a target whose tree differs from the checkpoint's (both
        checked on the manifest before any array is read). No checkpoint at all raises
        ``FileNotFoundError``.
        """
        self._manager.wait_until_finished()
        steps = self.steps()[::-1]
        if step is not None:
            if int(step) not in steps:
                raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} (steps: {steps[::-1]})")
            steps = [int(step)]
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        skipped: dict[int, str] = {}
        for s in steps:
            try:
                return self._restore_step(s, target, config, skipped)
            except _Damaged as e:
                if step is not None:
                    raise CheckpointError(self.directory, {s: str(e)}) from None
                log.warning("checkpoint step %d in %s is damaged (%s); trying an older step", s, self.directory, e)
                skipped[s] = str(e)
        raise CheckpointError(self.directory, skipped)

    def _read(self, step: int, **items) -> dict[str, Any]:
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # whatever Orbax/TensorStore raise on a damaged step
            log.debug("reading step %d of %s failed", step, self.directory, exc_info=True)
            raise _Damaged(_short(e)) from None

    def _manifest(self, step: int) -> dict[str, Any]:
        manifest = self._read(step, manifest=ocp.args.JsonRestore())["manifest"]
        keys = {"path", "shape", "dtype", "sha256"}
        if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT
                and {"leaves", "config", "extra_sha256"} <= set(manifest)
                and all(isinstance(d, dict) and keys <= set(d) for d in manifest["leaves"])):
            raise _Damaged("manifest is malformed or of another format")
        return manifest

    def _restore_step(self, step: int, target: PyTree, config, skipped: dict[int, str]) -> Restored:
        manifest = self._manifest(step)
        if config is not None and (diffs := config_differences(manifest["config"], config)):
            raise ValueError(f"checkpoint step {step} in {self.directory} was saved with another config: "
                             + "; ".join(diffs))
        if (mismatch := _tree_mismatch(manifest["leaves"], target)) is not None:
            raise ValueError(f"checkpoint step {step} in {self.directory} does not match the target: {mismatch}")
        items = {"state": ocp.args.StandardRestore(_abstract(target))}
        if manifest["extra_sha256"] is not None:
            items["extra"] = ocp.args.JsonRestore()
        restored = self._read(step, **items)
        tree, extra = restored["state"], restored.get("extra")
        expected = {d["path"]: d["sha256"] for d in manifest["leaves"]}
        for (path, _), host in zip(_leaves(target), _host(jax.tree.leaves(tree))):  # Orbax keeps target's structure
            if _sha256(host) != expected[path]:
                raise _Damaged(f"checksum mismatch at {path}")
        if extra is not None and _json_sha256(extra) != manifest["extra_sha256"]:
            raise _Damaged("checksum mismatch in extra")
        return Restored(tree, extra, step, manifest["config"], _fingerprint_of(manifest["leaves"]), skipped)

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----- frozen variables (teachers) -----

def save_variables(directory: str | os.PathLike, variables: PyTree, *,
                   config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Saves a model's variables (e.g. a trained teacher's) as step 0 and returns their :func:`fingerprint`.

    If ``directory`` already holds variables with the same fingerprint (structure, shapes, dtypes
    and values), nothing is written: the no-op is safe because the content is identical. If it holds
    different variables, ``ValueError`` says how they differ. They are never silently kept or
    replaced; delete the directory to replace them.
    """
    with Checkpointer(directory, max_to_keep=None) as ckpt:
        steps = ckpt.steps()
        if not steps:
            return ckpt.save(0, variables, config=config)
        if steps != [0]:
            raise ValueError(f"{ckpt.directory} holds steps {steps}, not variables written by save_variables")
        old, new = _fingerprint_of(ckpt.manifest(0)["leaves"]), fingerprint(variables)
        try:
            check_fingerprint(new, old, who=f"variables already saved in {ckpt.directory}")
        except ValueError as e:
            raise ValueError(f"{e}; save_variables never replaces variables, delete the directory first") from None
        return new


def load_variables(directory: str | os.PathLike, target: PyTree, *,
                   expected: Mapping[str, Any] | None = None) -> PyTree:
    """Loads variables saved by :func:`save_variables`, every leaf checked against its saved checksum.

    ``target`` (e.g. ``jax.eval_shape(model.init, ...)``) gives the structure and shardings. If
    ``expected`` (a :func:`fingerprint`, e.g. from a run's config) is given, the loaded variables
    must match it, or ``ValueError`` says how they differ.
    """
    with Checkpointer(directory, read_only=True) as ckpt:
        restored = ckpt.restore(target)
    if expected is not None:
        check_fingerprint(expected, restored.fingerprint, who=f"variables in {ckpt.directory}")
    return restored.tree
