"""One inference path: a model (a :class:`jaxkd.participants.Participant`) mapped over a dataset in eval mode.

Every offline pass of jaxkd goes through here — a frozen teacher's class means (ND), its embeddings (LELP),
its target log-probabilities (ALM's cache) or top-k distributions (the sparse-KD cache), the LM experiments'
bits per byte — so padding, batching and compiling are done once, the same way:

* batches are read from the participant's inputs (:attr:`Participant.input`: a key, keys, or a function);
* a batch smaller than the first (a dataset's last) is padded with zero rows up to its size, so the jitted
  function compiles once; padded rows carry ``False`` in every boolean entry (example and token masks) and
  their outputs are dropped;
* with a mesh, each batch is split over the data axes (:func:`jaxkd.sharding.shard_batch`) and the variables
  are used where they are (replicated or sharded, as the train state placed them).

:func:`map_batches` yields per-example outputs batch by batch (for streaming writers), :func:`map_rows` maps
row-aligned arrays and returns the stacked outputs, :func:`reduce_batches` sums per-batch sums on the device
(statistics, scores) and fetches once; :func:`sum_over_batches` does the same for a jitted score that is not
one participant's (decoding-time fusion of several models).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_int
from jaxkd.models.base import Outputs
from jaxkd.participants import Participant

PyTree = Any
#: ``fn(outputs, batch) -> pytree``: what is kept of a batch (per example, leading axis = batch; or sums).
OutputFn = Callable[[Outputs, Mapping[str, jax.Array]], PyTree]

__all__ = ["map_batches", "map_rows", "num_rows", "padded_batch", "reduce_batches", "sum_over_batches"]


def num_rows(batch: Mapping[str, Any]) -> int:
    """The examples in a batch: the shared length of its arrays' first axis."""
    rows = {np.shape(v)[0] for v in batch.values() if np.ndim(v)}
    if len(rows) != 1:
        raise ValueError(f"a batch's arrays must share their first (example) axis, got lengths {sorted(rows)}")
    return rows.pop()


def padded_batch(batch: Mapping[str, Any], size: int) -> tuple[dict[str, np.ndarray], int]:
    """``(batch padded to size rows, rows it had)``: zero rows appended to every array (``False`` for
    booleans, so example and token masks exclude them)."""
    arrays = {k: np.asarray(v) for k, v in batch.items()}
    have = num_rows(arrays)
    if have > size:
        raise ValueError(f"a batch has {have} rows, more than the first batch's {size}: batches may only shrink at "
                         "the end of a dataset")
    if have == size:
        return arrays, have
    return {k: np.concatenate([v, np.zeros((size - have, *v.shape[1:]), v.dtype)]) if v.ndim else v
            for k, v in arrays.items()}, have


@functools.lru_cache(maxsize=64)
def _compiled(model, input, fn: OutputFn, name: str) -> Callable:
    """The jitted ``(variables, batch) -> fn(outputs, batch)``, one per (model, input, fn): evaluating new
    variables of the same model (every evaluation of a run) reuses the compiled program."""
    reader = Participant(model, None, input=input)

    def run(variables, batch):
        outputs = model.apply(variables, reader.model_input(batch, name=name), train=False)
        return fn(outputs, batch)

    return jax.jit(run)


def _runner(participant: Participant, fn: OutputFn, name: str) -> tuple[Callable, PyTree]:
    if participant.variables is None:
        raise ValueError(f"participant {name!r} has no variables to run (give the trained or loaded ones)")
    return _compiled(participant.model, participant.input, fn, name), participant.variables


def _place(batch: dict[str, np.ndarray], mesh) -> Any:
    if mesh is None:
        return batch
    from jaxkd.sharding import shard_batch

    return shard_batch(batch, mesh)


def map_batches(participant: Participant, batches: Iterable[Mapping[str, Any]], fn: OutputFn, *, mesh=None,
                name: str = "model") -> Iterator[PyTree]:
    """Yields ``fn(outputs, batch)`` of every batch, fetched to host NumPy with the padded rows dropped.

    ``fn`` returns a pytree of per-example arrays (leading axis = the batch's rows). ``participant`` runs in
    eval mode with its own variables. One compile for all batches (a shorter last batch is padded).
    """
    (run, variables), size = _runner(participant, fn, name), None
    for batch in batches:
        size = num_rows(batch) if size is None else size
        padded, have = padded_batch(batch, size)
        out = jax.device_get(run(variables, _place(padded, mesh)))
        yield jax.tree.map(lambda a: np.asarray(a)[:have], out)


def map_rows(participant: Participant, rows: Mapping[str, Any], fn: OutputFn, *, batch_size: int, mesh=None,
             name: str = "model") -> PyTree:
    """``fn``'s per-example outputs for every row of ``rows`` (a mapping of arrays with a shared first axis,
    e.g. ``{"tokens": [N, T], "mask": [N, T]}``), in batches of ``batch_size``, stacked: leaves ``[N, ...]``."""
    check_int("batch_size", batch_size, low=1)
    arrays = {k: np.asarray(v) for k, v in rows.items()}
    n = num_rows(arrays)
    if n == 0:
        raise ValueError("rows is empty: nothing to run the model over")
    chunks = list(map_batches(participant, ({k: v[i:i + batch_size] for k, v in arrays.items()}
                                            for i in range(0, n, batch_size)), fn, mesh=mesh, name=name))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *chunks)


def reduce_batches(participant: Participant, batches: Iterable[Mapping[str, Any]], fn: OutputFn, *, mesh=None,
                   name: str = "model") -> PyTree:
    """The sum over batches of ``fn(outputs, batch)`` (a pytree of per-batch sums: counts, feature sums,
    nats), accumulated on the device and fetched once. ``fn`` must give padded rows no weight (they are all
    zeros, with ``False`` masks; a batch with no mask is never padded unless it is shorter than the first)."""
    run, variables = _runner(participant, fn, name)
    return sum_over_batches(lambda batch: run(variables, batch), batches, mesh=mesh)


def sum_over_batches(score: Callable[[Mapping[str, jax.Array]], PyTree], batches: Iterable[Mapping[str, Any]], *,
                     mesh=None) -> PyTree:
    """The sum over batches of ``score(batch)``, for what is not one participant (several models decoded
    together, a fused distribution): ``score`` is a jitted function of a batch returning per-batch sums.
    Batches are padded and placed as :func:`reduce_batches` does (the same rule for padded rows), the sums
    accumulated on the device and fetched once."""
    total, size = None, None
    for batch in batches:
        size = num_rows(batch) if size is None else size
        padded, have = padded_batch(batch, size)
        if have < size and not any(v.dtype == bool for v in padded.values()):
            raise ValueError("a shorter batch can be padded only when it carries a boolean mask to exclude the "
                             "padding (e.g. batch['mask'])")
        out = score(_place(padded, mesh))
        total = out if total is None else jax.tree.map(jnp.add, total, out)
    if total is None:
        raise ValueError("no batches to sum over")
    return jax.device_get(total)
