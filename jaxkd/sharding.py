"""Device meshes and sharding rules: data parallelism, FSDP and tensor parallelism on one mesh.

Every mesh has the same three axes, in this order: ``data`` (pure data parallelism: the batch is split,
parameters are replicated), ``fsdp`` (the batch is split *and* parameters/optimizer state are sharded,
gathered on use) and ``tensor`` (parameter dimensions split for tensor parallelism; the batch is
replicated over it). Unused axes have size 1, so one code path serves a laptop and a pod.

How a participant's (student's or teacher's) arrays are placed is data, a :class:`Rules`, turned into
``NamedSharding`` trees by :func:`param_shardings`. Two reference designs:

* MaxText (AI-Hypercomputer/maxtext) ``logical_axis_rules``: models name their parameter dimensions
  ("embed", "mlp"), a table maps those names onto mesh axes (``Rules.logical``).
* big_vision (google-research/big_vision) ``big_vision/sharding.py``: unannotated parameters get the
  ``fsdp`` rule (their largest divisible dimension is sharded) and path regexes pick explicit specs
  (``Rules.fsdp``, ``Rules.overrides``).

The mesh uses ``AxisType.Auto`` (classic GSPMD propagation): jit in/out shardings are the only
annotations and XLA propagates the rest. ``jax.make_mesh`` now defaults to explicit axes, under which
every op in a user's loss would carry sharding types and many would need annotations.

Multi-host: call :func:`initialize_distributed` before anything else touches JAX; :func:`make_mesh`
then spans all hosts' devices and :func:`shard_batch` takes each host's local slice of the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import re
import socket
import threading
import time
from collections import defaultdict
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax.core import meta
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
AXES = (DATA, FSDP, TENSOR)

MeshAxes = str | tuple[str, ...] | None


def make_mesh(axes: Mapping[str, int] | None = None, *, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: all global devices, across hosts).

    ``axes`` maps axis names to sizes; missing axes are 1 and one size may be -1 (the devices left).
    ``None`` means ``{"data": -1}``: pure data parallelism. Without a -1 the sizes must multiply to the
    device count exactly: pass ``devices`` to use a subset.
    """
    axes = {DATA: -1} if axes is None else dict(axes)
    devices = list(jax.devices() if devices is None else devices)
    unknown = sorted(set(axes) - set(AXES))
    if unknown:
        raise ValueError(f"unknown mesh axis {unknown}; the allowed axes are {list(AXES)}")
    for name, size in axes.items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {name!r} has size {size!r}; sizes are integers >= 1, or -1 (once)")
    free = [name for name, size in axes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {free}")
    sizes = {name: int(axes.get(name, 1)) for name in AXES}
    known = math.prod(size for size in sizes.values() if size != -1)
    n = len(devices)
    if free:
        if n % known:
            raise ValueError(f"{n} devices cannot be split: the fixed axis sizes multiply to {known}, "
                             f"which does not divide {n}")
        sizes[free[0]] = n // known
    elif known != n:
        raise ValueError(f"the mesh axis sizes {sizes} multiply to {known}, but there are {n} devices "
                         f"(use -1 for one axis, or pass devices=)")
    shape = tuple(sizes[name] for name in AXES)
    # Auto axes: GSPMD propagates shardings from the jit boundaries; explicit axes would put sharding
    # types on every op in user losses.
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


# ----- parameter rules -----

@dataclasses.dataclass(frozen=True)
class Rules:
    """How one participant's arrays are sharded; precedence: overrides, logical names, fsdp, replicated.

    * ``overrides``: ``(regex, PartitionSpec)`` pairs; the regex is searched (``re.search``) in the
      leaf's path ("Conv_0/kernel", or "opt_state/0/mu/Conv_0/kernel" for optimizer state); the first
      match wins. The explicit escape hatch, so it beats model annotations.
    * ``logical``: ``(logical name, mesh axis | axes | None)`` pairs, MaxText-style ``logical_axis_rules``
      for leaves annotated with ``nn.with_logical_partitioning``; translated by flax's
      ``nn.logical_to_mesh_axes`` (first rule whose mesh axes are still free wins; unmatched names
      leave their dimension unsharded). Without a table (the default rules) annotations are ignored
      and annotated leaves get the fsdp rule like any other.
    * ``fsdp``: for the remaining leaves, big_vision's ``fsdp`` rule over the ``fsdp`` axis: shard the
      largest dimension divisible by the axis size (ties go to the trailing dimension, as big_vision's
      reversed argsort does, e.g. output channels of a ``[3, 3, C, C]`` HWIO kernel). Leaves with fewer
      than ``min_size`` elements stay replicated. big_vision's floor is 4 MiB, which would leave every
      kernel of a CIFAR ResNet (the largest, 3x3x64x64, is 147 KiB) replicated and fsdp a no-op; 2**10
      elements (4 KiB in f32) keeps biases and norm scales whole, where an all-gather's fixed latency
      would outweigh the memory saved.
    """

    logical: tuple[tuple[str, MeshAxes], ...] = ()
    fsdp: bool = False
    overrides: tuple[tuple[str, PartitionSpec], ...] = ()
    min_size: int = 2**10

    def __post_init__(self):  # lists from configs become tuples, so Rules stays hashable
        object.__setattr__(self, "logical", tuple((k, tuple(v) if isinstance(v, list) else v)
                                                  for k, v in self.logical))
        as_spec = lambda v: PartitionSpec(*(tuple(e) if isinstance(e, list) else e for e in v))  # noqa: E731
        object.__setattr__(self, "overrides", tuple((k, as_spec(v)) for k, v in self.overrides))

    @classmethod
    def replicated(cls) -> Rules:
        """Every array whole on every device (pure data parallelism)."""
        return cls()

    @classmethod
    def fsdp_default(cls) -> Rules:
        """big_vision's fsdp rule for every array; no logical table or overrides."""
        return cls(fsdp=True)

    def check(self, mesh: Mesh) -> None:
        """Raises ValueError for a rule that names a mesh axis ``mesh`` lacks."""
        named = [(f"logical rule {name!r} -> {axes!r}", axes) for name, axes in self.logical]
        named += [(f"override {pattern!r} -> {spec}", tuple(spec)) for pattern, spec in self.overrides]
        for what, axes in named:
            missing = [a for a in _axis_names(axes) if a not in mesh.axis_names]
            if missing:
                raise ValueError(f"{what} names mesh axis {missing}; the mesh's axes are {list(mesh.axis_names)}")


def default_rules(mesh: Mesh) -> Rules:
    """fsdp when the mesh has an fsdp axis larger than 1, else replicated."""
    return Rules.fsdp_default() if mesh.shape.get(FSDP, 1) > 1 else Rules.replicated()


def _axis_names(entry: Any) -> list[str]:
    """The mesh axis names in a spec entry or a tuple of entries (None and nesting allowed)."""
    if entry is None:
        return []
    if isinstance(entry, str):
        return [entry]
    return [a for e in entry for a in _axis_names(e)]


def _fsdp_spec(shape: tuple[int, ...], mesh: Mesh, min_size: int) -> PartitionSpec:
    n = mesh.shape.get(FSDP, 1)
    if n == 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    # Largest divisible dimension; on ties the last one (big_vision: argsort(shape)[::-1]).
    candidates = [(size, dim) for dim, size in enumerate(shape) if size % n == 0]
    if not candidates:
        return PartitionSpec()
    _, dim = max(candidates)
    return PartitionSpec(*(None,) * dim, FSDP)


def _check_spec(path: str, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> None:
    if len(spec) > len(shape):
        raise ValueError(f"{path}: spec {spec} has {len(spec)} entries for an array of shape {shape}")
    for size, entry in zip(shape, spec):
        axis_size = math.prod(mesh.shape[a] for a in _axis_names(entry))
        if size % axis_size:
            raise ValueError(f"{path}: shape {shape} cannot take spec {spec}: dimension {size} is not "
                             f"divisible by mesh axis {entry!r} of size {axis_size}")


def path_str(path: tuple[Any, ...]) -> str:
    """A pytree key path as "a/b/0/c" (the names that ``Rules.overrides`` regexes see)."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def param_shardings(tree: Any, mesh: Mesh, rules: Rules | None = None, *, logical_specs: Any = None) -> Any:
    """A ``NamedSharding`` for each array (or ``ShapeDtypeStruct``) leaf of ``tree``.

    Works for params, batch stats and optimizer state alike (the fsdp rule goes by shape).
    ``logical_specs`` is an optional tree matching ``tree`` whose leaves are PartitionSpecs of logical
    names (:func:`logical_partition_specs`); a None or empty spec means "no annotation". ``rules``
    defaults to :func:`default_rules`. Scalars are always replicated.
    """
    rules = default_rules(mesh) if rules is None else rules
    rules.check(mesh)
    if logical_specs is None:
        logical_specs = jax.tree.map(lambda _: None, tree)

    def one(path, leaf, logical):
        shape, name = tuple(np.shape(leaf)), path_str(path)
        spec = PartitionSpec()
        if shape:
            override = next((s for pattern, s in rules.overrides if re.search(pattern, name)), None)
            if override is not None:
                spec = override
            elif rules.logical and logical is not None and len(logical):
                # Only with a table: names with nothing to map to would leave every dimension unsharded,
                # and an annotated model (the LM) would be replicated under the default fsdp rule.
                spec = nn.logical_to_mesh_axes(tuple(logical), rules.logical)
            elif rules.fsdp:
                spec = _fsdp_spec(shape, mesh, rules.min_size)
            _check_spec(name, shape, spec, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, tree, logical_specs)


def logical_partition_specs(boxed_variables: Any) -> Any:
    """Logical-name PartitionSpecs of a tree holding ``nn.LogicallyPartitioned`` boxes (``nn.get_partition_spec``).

    Unboxed arrays get None (flax gives them ``P()``), so :func:`param_shardings` applies the
    overrides/fsdp rules to them instead of replicating them.
    """
    is_box = lambda x: isinstance(x, meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(lambda x: nn.get_partition_spec(x) if is_box(x) else None, boxed_variables, is_leaf=is_box)


def boxed_shardings(boxed_variables: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """A ``NamedSharding`` per array of a tree holding flax metadata boxes (what ``model.init`` or
    ``jax.eval_shape`` of it gives): :func:`param_shardings` of the unboxed arrays, with the logical axis
    names the boxes carry. ``rules`` defaults to :func:`default_rules` of ``mesh``, so a train state
    (:func:`jaxkd.train_state.variable_shardings`) and a checkpoint loaded onto the mesh
    (:func:`jaxkd.models.from_hf`) place a model's variables alike."""
    return param_shardings(unbox(boxed_variables), mesh, rules, logical_specs=logical_partition_specs(boxed_variables))


def unbox(variables: Any) -> Any:
    """The arrays inside flax metadata boxes, without applying sharding constraints (``nn.unbox``)."""
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, meta.Partitioned)
                        else meta.unbox(x), variables, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def shard_like(tree: Any, shardings: Any) -> Any:
    """``jax.device_put`` of each leaf onto the matching sharding."""
    return jax.device_put(tree, shardings)


def shardings_of(tree: Any) -> Any:
    """The sharding of each array leaf (None for leaves that are not jax Arrays)."""
    return jax.tree.map(lambda x: x.sharding if isinstance(x, jax.Array) else None, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    """Whole on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


# ----- batches -----

def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Example axis split over (data, fsdp) together; other axes (and ``tensor``) replicated."""
    return NamedSharding(mesh, PartitionSpec((DATA, FSDP)))


def batch_shards(mesh: Mesh) -> int:
    """How many pieces the global batch is split into: data x fsdp."""
    return mesh.shape[DATA] * mesh.shape[FSDP]


def check_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """Raises ValueError unless the global batch splits evenly; returns the examples per shard."""
    n = batch_shards(mesh)
    if global_batch_size % n:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by data x fsdp = "
                         f"{mesh.shape[DATA]} x {mesh.shape[FSDP]} = {n}")
    return global_batch_size // n


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> Any:
    """Places a host batch (a dict/pytree of arrays) on the mesh, split along the example axis.

    One process: the batch is the global batch. Several processes: process ``p`` passes its local slice,
    rows ``p*b:(p+1)*b`` of the global batch (what :class:`jaxkd.data.Loader` yields on each host), and
    the result is the global array of ``b * process_count`` examples, the slices in process order. The
    mesh must give each process's devices exactly that block (data x fsdp a multiple of the process
    count, as :func:`make_mesh` lays devices out); otherwise ValueError.
    """
    sharding, n, processes = batch_sharding(mesh), batch_shards(mesh), jax.process_count()

    def one(path, value):
        value, key = np.asarray(value), path_str(path)
        if value.ndim == 0:
            raise ValueError(f"batch[{key!r}] is a scalar; batch entries need a leading example axis")
        size = value.shape[0] * processes
        if size % n:
            local = f" ({value.shape[0]} per process x {processes} processes)" if processes > 1 else ""
            raise ValueError(f"batch[{key!r}] has {size} examples{local}, not divisible by data x fsdp = "
                             f"{mesh.shape[DATA]} x {mesh.shape[FSDP]} = {n}")
        if processes == 1:
            return jax.device_put(value, sharding)
        global_shape = (size, *value.shape[1:])
        _check_process_rows(key, sharding, global_shape, value.shape[0])
        return jax.make_array_from_process_local_data(sharding, value, global_shape)

    return jax.tree_util.tree_map_with_path(one, batch)


def _check_process_rows(key: str, sharding: NamedSharding, global_shape: tuple[int, ...], local: int) -> None:
    """Process ``p``'s devices must hold exactly rows ``p*local:(p+1)*local`` of the global batch.

    That is the slice each host passes (:class:`jaxkd.data.Loader`'s per-host rows), so the global batch
    is the processes' slices concatenated in order. A mesh whose data x fsdp split is coarser than the
    hosts (pure tensor parallelism across hosts, or two hosts in one data shard) would make hosts
    replicas of each other: ``make_array_from_process_local_data`` would then silently assemble
    inconsistent rows (or a batch of ``local`` examples), so it is refused here.
    """
    process = jax.process_index()
    count, first, last = _process_rows(sharding, global_shape, process)
    lo = process * local
    if (count, first, last) != (local, lo, lo + local - 1):
        held = f"rows {first}..{last} ({count} rows)" if count else "no rows"
        mesh = sharding.mesh
        raise ValueError(
            f"batch[{key!r}]: process {process} of {jax.process_count()} passes its {local} examples (rows "
            f"{lo}..{lo + local - 1} of the global batch of {global_shape[0]}), but the mesh gives its devices "
            f"{held}. Each process must hold its own contiguous block of the batch: data x fsdp = "
            f"{mesh.shape[DATA]} x {mesh.shape[FSDP]} must be a multiple of the process count, with each "
            "process's devices consecutive along (data, fsdp) as make_mesh lays them out"
        )


@functools.lru_cache(maxsize=64)
def _process_rows(sharding: NamedSharding, global_shape: tuple[int, ...], process: int) -> tuple[int, int, int]:
    """How many rows of the batch's example axis ``process``'s devices hold, the first and the last
    (they are one contiguous block iff ``count == last - first + 1``); cached: it is checked every step."""
    rows: set[int] = set()
    for device, index in sharding.devices_indices_map(global_shape).items():
        if device.process_index == process:
            rows.update(range(*index[0].indices(global_shape[0])))
    return (len(rows), min(rows), max(rows)) if rows else (0, -1, -1)


# ----- multi-host -----

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAXKD_COORDINATOR", "JAXKD_NUM_PROCESSES", "JAXKD_PROCESS_ID"
ENV_INIT_TIMEOUT = "JAXKD_INIT_TIMEOUT"
#: Seconds every process waits for all of them to join (``jax.distributed.initialize``'s default).
DEFAULT_INIT_TIMEOUT = 300

log = logging.getLogger("jaxkd.sharding")


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids: Sequence[int] | None = None, *,
                           required: bool = False, initialization_timeout: int | None = None) -> bool:
    """Joins a multi-host run via ``jax.distributed.initialize``; returns True when it initialized.

    Values not given come from ``JAXKD_COORDINATOR`` ("host:port" of process 0),
    ``JAXKD_NUM_PROCESSES`` and ``JAXKD_PROCESS_ID`` (0-based). With none given or set it does
    nothing (single host) and returns False, unless ``required`` (a run declared multi-host: on a
    cluster, hosts that each ran alone would all write the same output folder), which raises
    ``ValueError`` like a partial configuration does, naming what is missing. It returns False too if
    JAX is already initialized (then nothing is required). Call it before any other JAX work. (On TPU pods or SLURM,
    ``jax.distributed.initialize()`` without arguments auto-detects everything; call it directly there.)

    ``initialization_timeout`` (default ``JAXKD_INIT_TIMEOUT``, else 300 s) bounds the wait for every
    process to join. A process other than 0 first waits that long for the coordinator to accept
    connections and raises ``TimeoutError`` naming it if it never does. Once connected, JAX's C++ client
    waits for the remaining processes and, past the deadline, aborts the process (SIGABRT with a C++
    stack trace, ``DEADLINE_EXCEEDED ... RegisterTask``): that cannot be caught from Python, so a
    warning logged while the wait lasts says which run is awaited and for how long.
    """
    def env_int(name: str) -> int | None:
        raw = os.environ.get(name)
        try:
            return None if raw in (None, "") else int(raw)
        except ValueError:
            raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None

    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else env_int(ENV_PROCESS_ID)
    values = {ENV_COORDINATOR: coordinator_address, ENV_NUM_PROCESSES: num_processes, ENV_PROCESS_ID: process_id}
    missing = [name for name, value in values.items() if value is None]
    if len(missing) == len(values) and local_device_ids is None and not required:
        return False
    if jax.distributed.is_initialized():
        return False  # e.g. by jax.distributed.initialize()'s own cluster detection (SLURM, TPU pods)
    if missing:
        raise ValueError(f"a multi-host run needs {', '.join(missing)} (not set; the coordinator is process 0's "
                         '"host:port", processes are numbered from 0), or pass them to initialize_distributed')
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes ({ENV_NUM_PROCESSES}) must be an integer >= 1, got {num_processes!r}")
    if isinstance(process_id, bool) or not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id ({ENV_PROCESS_ID}) must lie in [0, {num_processes}), got {process_id!r}")
    host, _, port = str(coordinator_address).rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f'coordinator_address ({ENV_COORDINATOR}) must be "host:port", got {coordinator_address!r}')
    if initialization_timeout is None:
        from_env = env_int(ENV_INIT_TIMEOUT)
        initialization_timeout = DEFAULT_INIT_TIMEOUT if from_env is None else from_env
    timeout = initialization_timeout
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 1:
        raise ValueError(f"initialization_timeout ({ENV_INIT_TIMEOUT}) must be a whole number of seconds >= 1, "
                         f"got {initialization_timeout!r}")

    who = f"process {process_id} of {num_processes}"
    deadline = time.monotonic() + initialization_timeout
    if process_id != 0:
        _await_coordinator(host.strip("[]"), int(port), deadline, who, coordinator_address, initialization_timeout)
    remaining = max(1, math.ceil(deadline - time.monotonic()))
    # JAX's client aborts the process (no Python exception) if the others do not join in time: say who is
    # awaited while it waits, so the C++ stack trace that may follow has a readable cause above it.
    notice = threading.Timer(min(10.0, initialization_timeout / 2), lambda: log.warning(
        "%s: still waiting for the other processes to join via coordinator %s; JAX aborts this process if they "
        "have not all joined %d s after the start (%s=%d)", who, coordinator_address, initialization_timeout,
        ENV_INIT_TIMEOUT, initialization_timeout))
    notice.daemon = True
    notice.start()
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids,
                                   initialization_timeout=remaining)
    finally:
        notice.cancel()
    return True


def _await_coordinator(host: str, port: int, deadline: float, who: str, address: str, timeout: int) -> None:
    """Waits until ``host:port`` accepts a TCP connection; ``TimeoutError`` naming it at ``deadline``.

    Before JAX's client connects: its own timeout ends in an abort, not an exception."""
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{who}: the coordinator {address} did not accept a connection within {timeout} s "
                    f"({ENV_INIT_TIMEOUT}={timeout}); start process 0 there, or check {ENV_COORDINATOR} "
                    "and that the port is reachable"
                ) from None
            time.sleep(0.2)


# ----- reporting -----

def describe(tree: Any) -> str:
    """One line per leaf: path, global shape, per-device shard shape, spec (for logs and benchmarks)."""
    rows = [("path", "shape", "shard", "spec")]
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape, sharding = tuple(np.shape(leaf)), getattr(leaf, "sharding", None)
        shard = sharding.shard_shape(shape) if sharding is not None else shape
        spec = getattr(sharding, "spec", "-")
        rows.append((path_str(path) or "<root>", str(shape), str(tuple(shard)), str(spec)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3] for row in rows)


def per_device_bytes(tree: Any) -> dict[Any, int]:
    """Bytes of each device's addressable shards, summed over the array leaves of ``tree``."""
    total: dict[Any, int] = defaultdict(int)
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                total[shard.device] += shard.data.nbytes
    return dict(total)
