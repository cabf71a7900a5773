"""One process of a (simulated) multi-host distillation run on CPU, for ``tests/test_multihost.py``.

    python tests/multihost_worker.py --process-id I --num-processes N --port P \
        --devices-per-process D --mesh data=2,fsdp=4 --out FILE

Every process builds the same tiny problem (ce + kd(temperature=4), a teacher with fixed variables, an
fsdp-sharded state over the global mesh of N x D devices), feeds its own rows ``p*b:(p+1)*b`` of each
fixed global batch (``b = B / N``, the slicing of :class:`jaxkd.data.Loader`) and takes three steps.
Process 0 then writes the per-step losses, the student's parameters (gathered to the host) and the
per-device shard shapes of one fsdp-sharded kernel to ``--out`` (npz). With N = 1 the process gets
the whole global batch, so the two runs must agree.

The environment is set up before JAX is imported: ``D`` simulated CPU devices, the CPU platform only.
Cross-process collectives on CPU go through Gloo over TCP (``jax_cpu_collectives_implementation``,
the default since JAX 0.4.36 and set here explicitly).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import numpy as np  # NumPy only: JAX must not be imported before set_up_environment

GLOBAL_BATCH = 16
NUM_STEPS = 3
NUM_CLASSES = 5
SHARDED_PARAM = "dense1/kernel"  # student [16, 64]: 1024 elements, split over fsdp on its 64 outputs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--devices-per-process", type=int, required=True)
    parser.add_argument("--mesh", default="data=2,fsdp=4", help="axis=size,... (jaxkd.sharding.make_mesh)")
    parser.add_argument("--out", required=True, help="npz written by process 0")
    return parser.parse_args(argv)


def set_up_environment(devices: int) -> None:
    """Must run before ``import jax``: XLA reads the device count once, when the CPU client is made."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


def global_batches(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [{"image": rng.normal(size=(GLOBAL_BATCH, 4, 4, 1)).astype(np.float32),
             "label": rng.integers(0, NUM_CLASSES, size=GLOBAL_BATCH).astype(np.int32)}
            for _ in range(NUM_STEPS)]


def main(argv=None) -> None:
    args = parse_args(argv)
    set_up_environment(args.devices_per_process)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jaxkd

    import jax
    import optax
    from jax.experimental import multihost_utils

    import jaxkd
    from jaxkd import methods, models, sharding

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.num_processes > 1:
        assert sharding.initialize_distributed(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)
    assert jax.process_count() == args.num_processes and jax.process_index() == args.process_id
    assert jax.local_device_count() == args.devices_per_process
    assert jax.device_count() == args.num_processes * args.devices_per_process

    axes = {name: int(size) for name, size in (item.split("=") for item in args.mesh.split(","))}
    mesh = sharding.make_mesh(axes)

    batches = global_batches()
    local = GLOBAL_BATCH // args.num_processes
    lo = args.process_id * local
    local_batches = [{k: v[lo:lo + local] for k, v in b.items()} for b in batches]

    teacher = models.get("mlp", num_classes=NUM_CLASSES, hidden_sizes=(128,))
    student = models.get("mlp", num_classes=NUM_CLASSES, hidden_sizes=(64,))
    teacher_vars = teacher.init(jax.random.PRNGKey(1), batches[0]["image"])
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
    state = jaxkd.create(student=student, teacher=teacher, teacher_variables=teacher_vars,
                         method=methods.ce() + methods.kd(temperature=4.0), tx=tx,
                         sample_batch=local_batches[0], rng=jax.random.PRNGKey(0), mesh=mesh)
    layer, name = SHARDED_PARAM.split("/")
    kernel = state.student.params[layer][name]
    spec = str(kernel.sharding.spec)
    shard_shapes = np.array([s.data.shape for s in kernel.addressable_shards])  # this process's devices
    teacher_kernel = state.teacher.params[layer][name]
    teacher_shard_shapes = np.array([s.data.shape for s in teacher_kernel.addressable_shards])

    # The processes' slices, placed on the mesh, must form exactly the global batch (in order).
    assembled = multihost_utils.process_allgather(sharding.shard_batch(local_batches[0], mesh), tiled=True)
    batch_assembled = all(np.array_equal(assembled[k], batches[0][k]) for k in batches[0])

    step = jaxkd.make_train_step(mesh=mesh)
    losses = []
    for batch in local_batches:
        state, metrics = step(state, batch)
        losses.append([float(metrics["loss"]), float(metrics["ce"]), float(metrics["kd"])])

    params = multihost_utils.process_allgather(state.student.params, tiled=True)  # whole arrays, every process
    flat = {sharding.path_str(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    if args.process_id == 0:
        np.savez(args.out, losses=np.array(losses, np.float32), step=int(jax.device_get(state.step)),
                 process_count=jax.process_count(), device_count=jax.device_count(), spec=spec,
                 batch_assembled=batch_assembled, shard_shapes=shard_shapes, teacher_shard_shapes=teacher_shard_shapes,
                 **{f"param/{k}": v for k, v in flat.items()})
    # Nobody leaves before everyone is done with the collectives above.
    multihost_utils.sync_global_devices("jaxkd multihost worker done")
    print(f"process {args.process_id}/{args.num_processes}: losses {losses}", flush=True)


if __name__ == "__main__":
    main()
