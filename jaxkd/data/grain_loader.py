"""The Grain iteration every loader shares: positions, resume state, per-process rows, threads and workers.

A loader is a pure function ``(epoch, step) -> batch`` iterated through Grain: a ``grain.MapDataset``
whose element ``k`` is global batch ``divmod(k, steps_per_epoch)``, iterated by Grain's iterator (whose
checkpoint state is the batch index).  :class:`GrainLoader` holds everything about that iteration which
does not depend on what the rows are: the batch geometry and epochs, the :class:`Position` of the next
batch, ``seek``/``get_state``/``set_state`` (resume), this process's part of every global batch and
Grain's reader threads or worker processes.  :class:`jaxkd.data.Loader` (images and labels) and
:class:`jaxkd.data.TextLoader` (packed token rows) are its two subclasses; :class:`jaxkd.data.Loader`
documents the behaviour they share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from jaxkd.checks import check_int

__all__ = ["GrainLoader", "Position"]


class Position(NamedTuple):
    """Where a loader (a :class:`GrainLoader`) is: the next batch is batch ``step`` of ``epoch``."""

    epoch: int
    step: int


# The entries of `Loader.get_state()` besides the position: a state saved by a loader
# with other values of these would give other batches, so `set_state` refuses it.
_STATE_CHECKS = ("seed", "batch_size", "num_examples")


class GrainLoader:
    """A pure batch function iterated through Grain: reproducible, resumable, per-process (see the module docstring).

    A subclass checks its rows, then calls :meth:`_set_iteration` (batch geometry, epochs, processes,
    Grain's threads and workers), sets ``self._maker`` (picklable, for Grain's worker processes:
    ``epoch_order(epoch)``, ``batch(epoch, step)``, and ``maker(k, _)``, global batch ``k``, as the
    ``map_with_index`` transform), calls :meth:`_start` and defines :attr:`num_examples`.
    """

    def _set_iteration(self, num_rows: int, *, batch_size, shuffle, seed, drop_remainder, num_epochs,
                       process_index, process_count, num_threads, worker_count) -> None:
        """Checks and sets what every loader shares (image or token rows alike): the batch geometry, the
        epochs, this process's part of each global batch and Grain's threads and workers."""
        check_int("batch_size", batch_size, low=1)
        check_int("seed", seed, low=0)
        if num_epochs is not None:
            check_int("num_epochs", num_epochs, low=1)
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        process_count = check_int("process_count", process_count, low=1)
        process_index = check_int("process_index", process_index, low=0)
        if process_index >= process_count:
            raise ValueError(
                f"process_index must be an integer in [0, process_count={process_count}), got"
                f" process_index={process_index}"
            )
        if batch_size % process_count:
            raise ValueError(
                f"batch_size must be divisible by process_count (each process reads an equal"
                f" part of every global batch), got batch_size={batch_size},"
                f" process_count={process_count}"
            )
        self.num_threads = check_int("num_threads", num_threads, low=0)
        self.worker_count = check_int("worker_count", worker_count, low=0)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_remainder = drop_remainder
        self.num_epochs = None if num_epochs is None else int(num_epochs)
        self.process_index, self.process_count = process_index, process_count
        if drop_remainder:
            self.steps_per_epoch = num_rows // self.batch_size
        else:
            self.steps_per_epoch = math.ceil(num_rows / self.batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{num_rows} examples give no full batch of {batch_size} with drop_remainder"
            )

    def _start(self, start) -> None:
        """No Grain iterator yet (made on the first ``next``); positioned at ``start``."""
        self._dataset = None
        self._iterator = None
        self._next_index = 0  # global batch index of the next batch: epoch * steps + step
        self.seek(start)

    # ------------------------------------------------------------ geometry

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.steps_per_epoch

    @property
    def num_examples(self) -> int:
        """Examples (rows) per epoch, before batching: the subclass's data."""
        raise NotImplementedError

    @property
    def local_batch_size(self) -> int:
        """Examples per batch on this process: ``batch_size // process_count``."""
        return self.batch_size // self.process_count

    # ------------------------------------------------------------ position and state

    @property
    def position(self) -> Position:
        """Position of the next batch to be yielded (normalized: step < steps_per_epoch)."""
        return Position(*divmod(self._next_index, self.steps_per_epoch))

    def _end(self) -> int | None:
        return None if self.num_epochs is None else self.num_epochs * self.steps_per_epoch

    def seek(self, position: Position | tuple[int, int]) -> None:
        """Moves to ``position``; a step past the epoch's end rolls over.

        Raises:
            ValueError: ``position`` is not a pair of integers ``>= 0``.
        """
        try:
            epoch, step = position
        except (TypeError, ValueError):
            raise ValueError(
                f"position must be a pair (epoch, step), got position={position!r}"
            ) from None
        epoch = check_int("position.epoch", epoch, low=0)
        step = check_int("position.step", step, low=0)
        self._next_index = epoch * self.steps_per_epoch + step
        end = self._end()
        if self._iterator is not None:
            if self.worker_count == 0 and (end is None or self._next_index <= end):
                # Grain's own checkpoint state of the iterator is the batch index.
                self._iterator.set_state({"next_index": self._next_index})
            else:
                self.close()

    def get_state(self) -> dict[str, int]:
        """The loader's state as a small JSON-serializable dict, e.g. for an Orbax ``JsonSave``.

        ``{"epoch": e, "step": s, "seed": ..., "batch_size": ..., "num_examples": ...}``: the
        next batch is batch ``s`` of epoch ``e`` (global batches, the same on every process);
        the other entries identify the stream, so :meth:`set_state` can refuse a state saved
        by a loader that would give other batches.
        """
        epoch, step = self.position
        return {
            "epoch": int(epoch),
            "step": int(step),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_examples": self.num_examples,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores a state from :meth:`get_state` (of this loader or one built alike).

        The batches that follow are bitwise those that followed when the state was saved.

        Raises:
            ValueError: ``state`` lacks ``epoch``/``step``, or its ``seed``, ``batch_size`` or
                ``num_examples`` differ from this loader's.
        """
        if not isinstance(state, Mapping) or not {"epoch", "step"} <= set(state):
            raise ValueError(
                f"state must be a dict with 'epoch' and 'step' (from Loader.get_state()),"
                f" got state={state!r}"
            )
        for key in _STATE_CHECKS:
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"state was saved by a loader with {key}={state[key]!r}, this loader has"
                    f" {key}={getattr(self, key)!r}: its batches would differ"
                )
        self.seek((state["epoch"], state["step"]))

    # ------------------------------------------------------------ batches

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order in which epoch ``epoch`` visits the examples (read-only)."""
        return self._maker.epoch_order(epoch)

    def batch(self, position: Position | tuple[int, int]) -> dict[str, np.ndarray]:
        """This process's part of the batch at ``position`` (pure: does not move the loader)."""
        epoch, step = position
        return self._maker.batch(int(epoch), int(step))

    @property
    def dataset(self):
        """The ``grain.MapDataset`` of all batches: element ``k`` is ``batch(divmod(k, len(self)))``."""
        if self._dataset is None:
            import grain

            self._dataset = (
                grain.MapDataset.range(self.steps_per_epoch)
                .repeat(self.num_epochs)
                .map_with_index(self._maker)
            )
        return self._dataset

    def _make_iterator(self):
        import grain

        if self.worker_count == 0:
            read = grain.ReadOptions(
                num_threads=self.num_threads, prefetch_buffer_size=2 * self.num_threads
            )
            iterator = self.dataset.to_iter_dataset(read).__iter__()
            iterator.set_state({"next_index": self._next_index})
            return iterator
        # Each worker process builds every worker_count-th batch of what follows; Grain
        # returns them in order.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            # grain 0.2.18's mp_prefetch reads an absl flag directly and raises
            # UnparsedFlagAccessError outside an absl app; take the defaults.
            flags.FLAGS.mark_as_parsed()
        read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        workers = grain.MultiprocessingOptions(
            num_workers=self.worker_count, per_worker_buffer_size=2
        )
        return (
            self.dataset[self._next_index :].to_iter_dataset(read).mp_prefetch(workers).__iter__()
        )

    def __iter__(self) -> GrainLoader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        end = self._end()
        if end is not None and self._next_index >= end:
            raise StopIteration
        if self._iterator is None:
            self._iterator = self._make_iterator()
        batch = next(self._iterator)
        # Advance before returning: while the consumer holds batch (e, s),
        # `position` already names the batch that comes next (the resume point).
        self._next_index += 1
        return batch

    def close(self) -> None:
        """Stops Grain's reader threads / worker processes; iterating again restarts them."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None

    def __enter__(self) -> GrainLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
