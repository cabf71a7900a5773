"""Training-loader throughput: the hand-written NumPy loop vs Grain pipelines (host CPU only).

    python benchmarks/data_pipeline.py [--runs 3] [--quick]

Two training streams (shuffled every epoch, augmented, normalized, drop_remainder, repeated forever):

* digits: the 1297 x 8x8x1 uint8 images of jaxkd's ``digits`` train split, batch 64, ``shift``;
* cifar: a synthetic CIFAR-sized split, 50000 x 32x32x3 uint8 (random pixels), batch 128,
  ``crop_flip`` (pad 4, random crop, horizontal flip).

Pipelines (all single host; the first batches are checked to be what the row says):

* ``hand-written loop``: the pre-Grain ``jaxkd.data.Loader.__iter__``: a Python loop that
  gathers ``default_rng([seed, 0, epoch]).permutation(N)[step * B:(step + 1) * B]`` and calls
  :func:`jaxkd.data.augment` / :func:`jaxkd.data.normalize` on the whole batch.
* ``jaxkd batch function, plain loop``: ``jaxkd.data.Loader.batch((epoch, step))`` (the
  function the Grain pipeline maps over batch indices) called in a Python loop, without Grain:
  the difference to the ``jaxkd Loader (Grain)`` rows is Grain's own cost.
* ``Grain, per example``: the textbook Grain pipeline, ``MapDataset.source(examples).shuffle()
  .random_map(augment one example).repeat().batch().map(normalize)``: Grain shuffles, augments
  and stacks example by example (same batch format, other random draws).
* ``Grain, index batches``: Grain shuffles and batches the indices (``MapDataset.range(N)
  .shuffle().batch().repeat()``), one vectorized gather + augment + normalize per batch.
* ``jaxkd Loader (Grain), ...``: :class:`jaxkd.data.Loader` as shipped: a ``grain.MapDataset``
  whose element ``k`` is whole batch ``k`` built by the hand-written loop's vectorized code (with
  the normalization constants computed once instead of per batch; bitwise the same batches,
  checked), iterated by Grain in the calling thread
  (``num_threads=0``), with Grain reader threads (``num_threads``), or with Grain worker
  processes (``worker_count``, ``mp_prefetch``).

Each cell is the median over ``--runs`` fresh pipelines (run interleaved: each round runs every
pipeline once) of the steady-state rate over a fixed number of batches, after warm-up batches
(the start-up column: construction until the first batch, median, where worker processes are
spawned and sent the arrays). Nothing consumes the
batches: this is the loader alone, which a training step on the same cores would compete with.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

import grain
from jaxkd.data import Loader
from jaxkd.data.images import augmentation, normalization

SEED = 0


def handwritten(images, labels, *, batch_size, mean, std, augment, seed=SEED):
    """The pre-Grain Loader's iteration (jaxkd before this change), as a generator."""
    n = images.shape[0]
    steps = n // batch_size
    epoch = 0
    while True:
        order = np.random.default_rng([seed, 0, epoch]).permutation(n)
        for step in range(steps):
            idx = order[step * batch_size : (step + 1) * batch_size]
            rng = np.random.default_rng([seed, 1, epoch, step])
            batch = augmentation.augment(images[idx], augment, rng)
            yield {"image": normalization.normalize(batch, mean, std), "label": labels[idx]}
        epoch += 1


def batch_function_loop(images, labels, *, batch_size, mean, std, augment, seed=SEED):
    """jaxkd's batch function (``Loader.batch``) called in a plain Python loop: no Grain."""
    loader = jaxkd_loader()(images, labels, batch_size=batch_size, mean=mean, std=std,
                            augment=augment, seed=seed)
    k = 0
    while True:
        yield loader.batch(divmod(k, len(loader)))
        k += 1


def _augment_one(image, mode, rng):
    """``augment`` for one example: the per-example pipeline's random_map."""
    return augmentation.augment(image[None], mode, rng)[0]


def grain_per_example(images, labels, *, batch_size, mean, std, augment, seed=SEED):
    examples = [{"image": images[i], "label": labels[i]} for i in range(images.shape[0])]
    ds = (
        grain.MapDataset.source(examples)
        .shuffle(seed=seed)
        .random_map(lambda ex, rng: {**ex, "image": _augment_one(ex["image"], augment, rng)}, seed=seed)
        .repeat(None)
        .batch(batch_size, drop_remainder=True)
        .map(lambda b: {"image": normalization.normalize(b["image"], mean, std), "label": b["label"]})
    )
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def grain_index_batches(images, labels, *, batch_size, mean, std, augment, seed=SEED):
    steps = images.shape[0] // batch_size

    def make(k, idx):
        rng = np.random.default_rng([seed, 1, *divmod(k, steps)])
        batch = augmentation.augment(images[idx], augment, rng)
        return {"image": normalization.normalize(batch, mean, std), "label": labels[idx]}

    ds = (
        grain.MapDataset.range(images.shape[0])
        .shuffle(seed=seed)
        .batch(batch_size, drop_remainder=True)
        .repeat(None)
        .map_with_index(make)
    )
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def jaxkd_loader(num_threads=0, worker_count=0):
    def build(images, labels, *, batch_size, mean, std, augment, seed=SEED):
        return Loader(
            images, labels, batch_size=batch_size, mean=mean, std=std, shuffle=True, seed=seed,
            drop_remainder=True, num_epochs=None, augment=augment, process_index=0,
            process_count=1, num_threads=num_threads, worker_count=worker_count,
        )

    return build


PIPELINES = {
    "hand-written loop (pre-Grain Loader)": handwritten,
    "jaxkd batch function, plain loop (no Grain)": batch_function_loop,
    "Grain, per example (shuffle/random_map/batch)": grain_per_example,
    "Grain, index batches (shuffle/batch indices)": grain_index_batches,
    "jaxkd Loader (Grain), in calling thread": jaxkd_loader(),
    "jaxkd Loader (Grain), 1 reader thread": jaxkd_loader(num_threads=1),
    "jaxkd Loader (Grain), 2 reader threads": jaxkd_loader(num_threads=2),
    "jaxkd Loader (Grain), 2 worker processes": jaxkd_loader(worker_count=2),
}
SAME_AS_HANDWRITTEN = {name for name in PIPELINES if name.startswith("jaxkd")}


def datasets(quick: bool):
    from sklearn.datasets import load_digits

    bunch = load_digits()  # the digits split's images, without preparing the TFDS builder
    digits = np.rint(bunch.images * 255 / 16).astype(np.uint8)[..., None][:1297]
    rng = np.random.default_rng(0)
    n = 10_000 if quick else 50_000
    cifar = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    return {
        "digits (1297 x 8x8x1, batch 64, shift)": dict(
            images=digits, labels=bunch.target[:1297].astype(np.int32), batch_size=64,
            mean=normalization.DIGITS_MEAN, std=normalization.DIGITS_STD, augment="shift",
            warmup=50, batches=500 if quick else 3000,
        ),
        f"cifar ({n} x 32x32x3, batch 128, crop_flip)": dict(
            images=cifar, labels=rng.integers(0, 10, n).astype(np.int32), batch_size=128,
            mean=normalization.CIFAR10_MEAN, std=normalization.CIFAR10_STD, augment="crop_flip",
            warmup=20, batches=100 if quick else 500,
        ),
    }


def measure(build, data) -> tuple[float, float]:
    """(start-up seconds, steady-state batches per second) of one fresh pipeline."""
    kw = {k: data[k] for k in ("images", "labels", "batch_size", "mean", "std", "augment")}
    start = time.perf_counter()
    it = build(**kw)
    next(it)
    startup = time.perf_counter() - start
    for _ in range(data["warmup"]):
        next(it)
    start = time.perf_counter()
    for _ in range(data["batches"]):
        next(it)
    rate = data["batches"] / (time.perf_counter() - start)
    if hasattr(it, "close"):
        it.close()
    return startup, rate


def check_same(build, data, count=25) -> None:
    kw = {k: data[k] for k in ("images", "labels", "batch_size", "mean", "std", "augment")}
    ref, it = handwritten(**kw), build(**kw)
    for _ in range(count):
        a, b = next(ref), next(it)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    if hasattr(it, "close"):
        it.close()


def check_format(build, data) -> None:
    kw = {k: data[k] for k in ("images", "labels", "batch_size", "mean", "std", "augment")}
    it = build(**kw)
    a, b = next(handwritten(**kw)), next(it)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, (k, a[k].shape, b[k].shape)
    if hasattr(it, "close"):
        it.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smaller cifar split, fewer batches")
    parser.add_argument("--only", nargs="*", default=None, help="pipeline names containing these")
    args = parser.parse_args()
    names = [n for n in PIPELINES if not args.only or any(o in n for o in args.only)]
    print(
        f"grain {grain.__version__}, numpy {np.__version__}, Python {platform.python_version()},"
        f" {os.cpu_count()} CPUs ({platform.processor() or platform.machine()});"
        f" median of {args.runs} runs"
    )
    print()
    print("| data | pipeline | batches/s | examples/s | vs hand-written | start-up (s) |")
    print("|---|---|---|---|---|---|")
    for data_name, data in datasets(args.quick).items():
        for name in names:
            if name in SAME_AS_HANDWRITTEN:
                check_same(PIPELINES[name], data)
            else:
                check_format(PIPELINES[name], data)
        # Runs interleaved (every pipeline once per round), so that load from other processes on
        # the machine falls on all rows alike.
        results = {name: [] for name in names}
        for _ in range(args.runs):
            for name in names:
                results[name].append(measure(PIPELINES[name], data))
        base = None
        for name in names:
            startup = float(np.median([s for s, _ in results[name]]))
            rate = float(np.median([r for _, r in results[name]]))
            if name.startswith("hand-written"):
                base = rate
            ratio = "-" if base is None else f"{rate / base:.2f}x"
            print(
                f"| {data_name} | {name} | {rate:,.0f} | {rate * data['batch_size']:,.0f} |"
                f" {ratio} | {startup:.2f} |",
                flush=True,
            )

if __name__ == "__main__":
    main()
