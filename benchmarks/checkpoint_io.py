"""Time checkpoint save (until the write is on disk) and restore of a train-state-sized tree.

    python benchmarks/checkpoint_io.py [--repeats 3] [--dir /tmp/somewhere]

Each tree is the ``{"params", "batch_stats"}`` variables of a CIFAR-100 ResNet plus its SGD
momentum (``optax.sgd(momentum=0.9)``): resnet8x4, resnet32x4, and both together (a teacher and a
student). Each row gives the median over ``--repeats`` runs of these:

* ``save (returns)``: ``Checkpointer.save`` until it returns. This is the host copy, the sha256 of
  each leaf, and Orbax's blocking part. The train loop is stalled for this long.
* ``save + wait``: the same, then ``wait_until_finished()``, so the step is on disk.
* ``restore``: ``Checkpointer.restore``. It reads the manifest, checks the tree, reads the arrays and
  verifies each leaf's checksum.
* ``orbax save + wait`` and ``orbax restore``: plain ``orbax.checkpoint.CheckpointManager`` on the
  same tree, without manifest or checksums. This is what the verification costs over Orbax alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from jaxkd import models  # noqa: E402
from jaxkd.checkpoint import Checkpointer, _abstract  # noqa: E402


def model_state(name: str) -> dict:
    model = models.get(name, num_classes=100)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, 32, 32, 3)))
    momentum = optax.sgd(0.1, momentum=0.9).init(variables["params"])
    momentum = jax.tree.map(lambda a: a + 0.01, momentum)  # non-zero, as after a step
    return {"variables": variables, "opt_state": momentum}


def megabytes(tree) -> float:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 2**20


def median_seconds(fn, repeats: int) -> float:
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_tree(tree, directory: str, repeats: int) -> dict[str, float]:
    jax.block_until_ready(tree)
    target = jax.tree.map(jnp.zeros_like, tree)
    returns, written = [], []
    with Checkpointer(os.path.join(directory, "jaxkd"), max_to_keep=2) as ckpt:
        for i in range(repeats):  # each save is timed alone: Orbax makes a save wait for the previous one
            start = time.perf_counter()
            ckpt.save(i, tree, extra={"batch": i})
            returns.append(time.perf_counter() - start)
            ckpt.wait_until_finished()
            written.append(time.perf_counter() - start)
        out = {"save (returns)": statistics.median(returns), "save + wait": statistics.median(written)}
        out["restore"] = median_seconds(lambda i: jax.block_until_ready(ckpt.restore(target).tree), repeats)
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    with ocp.CheckpointManager(os.path.join(directory, "orbax"), options=options) as plain:
        def plain_save(i):
            plain.save(i, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)), force=True)
            plain.wait_until_finished()
        out["orbax save + wait"] = median_seconds(plain_save, repeats)
        abstract = ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(target)))
        out["orbax restore"] = median_seconds(
            lambda i: jax.block_until_ready(plain.restore(repeats - 1, args=abstract)["state"]), repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    small, large = model_state("resnet8x4"), model_state("resnet32x4")
    trees = {"resnet8x4 + momentum": small, "resnet32x4 + momentum": large,
             "both (teacher + student)": {"teacher": large, "student": small}}
    columns = ["save (returns)", "save + wait", "restore", "orbax save + wait", "orbax restore"]
    print(f"jax {jax.__version__}, orbax-checkpoint {ocp.__version__}, {jax.devices()[0].platform}, "
          f"median of {args.repeats}\n")
    print("| tree | MB | leaves | " + " | ".join(f"{c} (ms)" for c in columns) + " |")
    print("|---|---:|---:|" + "---:|" * len(columns))
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        for i, (name, tree) in enumerate(trees.items()):
            times = time_tree(tree, os.path.join(root, str(i)), args.repeats)
            cells = " | ".join(f"{1000 * times[c]:.0f}" for c in columns)
            print(f"| {name} | {megabytes(tree):.1f} | {len(jax.tree.leaves(tree))} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
