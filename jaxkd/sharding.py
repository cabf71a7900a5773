"""Device meshes and shardings for the train step (first version: one ``data`` axis).

The step is ``jax.jit`` with ``NamedSharding`` in/out shardings (the modern pjit): the train state is
replicated, the batch is split along its leading axis over the ``data`` axis, and XLA inserts the
gradient all-reduce. The mesh uses ``AxisType.Auto`` (classic pjit propagation), decided once here:
jax >= 0.7's ``jax.make_mesh`` defaults to explicit axes, which would make every op in user losses
carry sharding types.

Multi-host: call ``jax.distributed.initialize`` first; :func:`shard_batch` then treats the host's
batch as its local slice of the global batch (``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None, *, axis_name: str = DATA_AXIS) -> Mesh:
    """A 1-axis mesh over the first ``num_devices`` devices (all devices by default)."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_devices must lie in [1, {len(devices)}], got {num_devices}")
    return jax.make_mesh((n,), (axis_name,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, *, axis_name: str = DATA_AXIS) -> NamedSharding:
    """Leading (example) axis split over ``axis_name``; the other axes replicated."""
    return NamedSharding(mesh, PartitionSpec(axis_name))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, *, axis_name: str = DATA_AXIS) -> dict[str, jax.Array]:
    """Places a host batch on the mesh, split along the example axis.

    Single process: the batch is the global batch. Several processes: each passes its local slice and
    the result is the global array (the global batch size is ``local * process_count``).
    """
    sharding = batch_sharding(mesh, axis_name=axis_name)
    size = mesh.shape[axis_name]
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if jax.process_count() == 1:
            if value.shape[0] % size:
                raise ValueError(
                    f"batch[{key!r}] has {value.shape[0]} examples, not divisible by the {size} devices "
                    f"of mesh axis {axis_name!r}"
                )
            out[key] = jax.device_put(value, sharding)
        else:
            out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out
