"""Orbax checkpoints of the whole train state, plus the data iterator's position, for exact resume.

``Checkpointer`` wraps ``orbax.checkpoint.CheckpointManager``: the train state's arrays go through
``StandardSave`` (so a state sharded over one mesh restores onto another by passing a target with the
wanted shardings), the data position through ``JsonSave``. Restoring needs a target state of the
same structure — build it with :func:`jaxkd.train_state.create` exactly as for a fresh run; its
static fields (models, optimizer, method) come from there, its arrays from the checkpoint.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

PyTree = Any


def _abstract(tree: PyTree) -> PyTree:
    """Shape/dtype/sharding stand-ins, so restoring never needs a second copy of the arrays."""

    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(leaf, tree)


class Checkpointer:
    """Saves and restores ``(train state, data position)`` pairs under ``directory/<step>/``.

    Args:
      directory: where checkpoints live (created if missing; made absolute, as Orbax requires).
      max_to_keep: how many recent checkpoints to keep (``None`` keeps all).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: PyTree, *, data_position: Mapping[str, Any] | None = None) -> None:
        """Writes the checkpoint for ``step`` and waits until it is on disk."""
        args = {"state": ocp.args.StandardSave(state)}
        if data_position is not None:
            args["data"] = ocp.args.JsonSave(dict(data_position))
        self._manager.save(int(step), args=ocp.args.Composite(**args))
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, target: PyTree, *, step: int | None = None) -> tuple[PyTree, dict[str, Any] | None]:
        """Returns ``(state, data_position)``; ``target`` gives the structure, shardings and static fields.

        ``step`` defaults to the latest checkpoint; a missing checkpoint raises ``FileNotFoundError``.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        args = {"state": ocp.args.StandardRestore(_abstract(target))}
        has_data = os.path.isdir(os.path.join(self.directory, str(step), "data"))
        if has_data:
            args["data"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"], (dict(restored["data"]) if has_data else None)

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_variables(directory: str | os.PathLike, variables: PyTree) -> None:
    """Saves a model's variables (e.g. a trained teacher's ``{"params", "batch_stats"}``) as step 0."""
    with Checkpointer(directory, max_to_keep=1) as ckpt:
        ckpt.save(0, variables)


def load_variables(directory: str | os.PathLike, target: PyTree) -> PyTree:
    """Loads variables saved by :func:`save_variables`; ``target`` (e.g. ``model.init(...)``) gives the structure."""
    with Checkpointer(directory, max_to_keep=1) as ckpt:
        variables, _ = ckpt.restore(target)
    return variables
