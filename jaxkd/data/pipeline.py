"""Host-side input pipeline: load a TFDS split into memory, batch it with Grain.

Nothing here imports TensorFlow or touches the network.

Loading
    :func:`load_split` reads a whole split into memory as a :class:`Split`
    (uint8 images ``[N, H, W, C]``, int32 labels ``[N]``, ``num_classes``).
    ``"digits"`` is jaxkd's own builder (:mod:`jaxkd.data.digits`), prepared on
    first use from the copy that ships with scikit-learn.  Any other name goes
    through ``tfds.builder(name, data_dir=...).as_data_source(split)`` and must
    already be prepared in ``data_dir`` in the ``array_record`` format; jaxkd
    never downloads, it raises :class:`FileNotFoundError` with instructions.

Batching
    :class:`Loader` is a Grain pipeline over in-memory arrays: a ``grain.MapDataset``
    whose element ``k`` is the whole batch ``k`` (gathered, augmented and normalized
    in one vectorized NumPy call), iterated by Grain's iterator.  Everything random
    is a pure function of ``(seed, epoch)`` (the shuffling order) and
    ``(seed, epoch, step)`` (the augmentation of one batch), so a run resumes
    exactly from a :class:`Position` (``loader.position`` / ``start=``) or from the
    JSON dict of ``loader.get_state()`` / ``loader.set_state()``.  With several JAX
    processes each reads its own equal slice of every global batch.
    Each batch is ``{"image": float32 [B, H, W, C], "label": int32 [B]}``; with
    ``drop_remainder=False`` (evaluation) every batch also carries
    ``"mask": bool [B]`` and the last partial batch is padded to ``B`` (zero
    images, label 0, mask False), so one compiled eval step serves all batches.

Normalization
    ``image = (uint8 / 255 - mean) / std`` per channel.  :data:`NORMALIZATION`
    holds the constants for ``digits`` (computed from its train split; see
    :func:`channel_stats`) and the usual CIFAR-10/100 train-set statistics.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from jaxkd.checks import check_choice, check_int, check_label_values, check_number, check_positive

__all__ = [
    "AUGMENTATIONS",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "Loader",
    "NORMALIZATION",
    "Position",
    "Split",
    "augment",
    "channel_stats",
    "load_split",
    "normalize",
    "subset_per_class",
    "validate_labels",
]

# Per-channel mean/std of the images scaled to [0, 1].
# digits: computed from jaxkd's digits `train` split (1297 images, one channel);
# `tests/test_data.py` recomputes them.
DIGITS_MEAN = (0.3054,)
DIGITS_STD = (0.3758,)
# CIFAR: the standard statistics of the 50000 training images.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": (DIGITS_MEAN, DIGITS_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
}

Augmentation = Literal["none", "shift", "crop_flip"]
AUGMENTATIONS: tuple[str, ...] = ("none", "shift", "crop_flip")


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a data set, in memory.

    Attributes:
        images: uint8 ``[N, H, W, C]``.
        labels: int32 ``[N]``, each in ``[0, num_classes)``.
        num_classes: number of classes of the data set's ``label`` feature.
        name: data set name (e.g. ``"digits"``).
        split: split name as requested (e.g. ``"train"``).

    ``split["image"]`` / ``split["label"]`` give the arrays, so a ``Split`` can
    be used where a ``dict[str, np.ndarray]`` is expected.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str = ""
    split: str = ""

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 [N, H, W, C], got {self.images.dtype}"
                f" {self.images.shape}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels shape {self.labels.shape} does not match"
                f" {self.images.shape[0]} images"
            )
        validate_labels(self.labels, self.num_classes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, key: str) -> np.ndarray:
        return self.as_dict()[key]

    def keys(self):
        return ("image", "label")

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"image": self.images, "label": self.labels}

    def subset(self, indices: np.ndarray) -> Split:
        """The examples at ``indices`` (e.g. from :func:`subset_per_class`)."""
        indices = np.asarray(indices)
        return dataclasses.replace(
            self, images=self.images[indices], labels=self.labels[indices]
        )


def validate_labels(labels: np.ndarray, num_classes: int) -> None:
    """Raises ``ValueError`` unless every label is an integer in ``[0, num_classes)``."""
    check_int("num_classes", num_classes, low=1)
    check_label_values(np.asarray(labels), num_classes)


def _prepare_instructions(name: str, data_dir: str) -> str:
    return (
        f"Dataset {name!r} is not prepared (in a random-access format) in"
        f" data_dir {data_dir!r}, and jaxkd never downloads data. Prepare it on a"
        " machine with internet access, with the TFDS CLI:\n"
        f"    tfds build {name} --data_dir <dir> --file_format array_record\n"
        "or in Python:\n"
        f"    tfds.builder({name!r}, data_dir='<dir>')"
        ".download_and_prepare(file_format='array_record')\n"
        f"then copy the folder <dir>/{name} to {data_dir}/{name}. (Preparing"
        " most TFDS data sets needs `pip install tensorflow importlib_resources`"
        " on that machine; reading the array_record files here needs neither.)"
    )


def _resolve_data_dir(data_dir: str | None) -> str:
    if data_dir is not None:
        return str(data_dir)
    from tensorflow_datasets.core import constants

    return constants.get_default_data_dir()  # $TFDS_DATA_DIR or ~/tensorflow_datasets


def _check_writable(data_dir: str | None, name: str) -> None:
    """Raises ``ValueError`` unless ``data_dir`` can be created and a file written in it.

    Without this, TFDS fails deep inside ``download_and_prepare`` with a message that does not name
    the directory (e.g. "not enough disk space" for a read-only one).
    """
    path = _resolve_data_dir(data_dir)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(
            f"data_dir must be a writable directory to prepare {name!r} on first use, got"
            f" data_dir={path!r} ({type(e).__name__}: {e.strerror or e}). Point data_dir at"
            f" a writable directory, or at one where {name!r} is already prepared."
        ) from e


def _digits_builder(data_dir: str | None):
    """jaxkd's digits builder, prepared into ``data_dir`` on first use (offline)."""
    import tensorflow_datasets as tfds

    from jaxkd.data.digits import Digits

    builder = Digits(data_dir=data_dir)
    if not builder.is_prepared():
        _check_writable(data_dir, "digits")
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
            file_format="array_record",
        )
    return builder


def _read_records(source: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Stacks the ``image`` / ``label`` fields of a TFDS data source."""
    n = len(source)
    if n == 0:
        raise ValueError("the split is empty")
    first = source[0]
    if "image" not in first or "label" not in first:
        raise KeyError(
            f"records need 'image' and 'label' keys, got {sorted(first)}"
        )
    image0 = np.asarray(first["image"])
    images = np.empty((n, *image0.shape), dtype=np.uint8)
    labels = np.empty((n,), dtype=np.int64)
    # Records decode one by one anyway (PNG); fill preallocated arrays.
    for i in range(n):
        record = first if i == 0 else source[i]
        images[i] = record["image"]
        labels[i] = record["label"]
    if images.ndim == 3:  # [N, H, W] grey-scale: add the channel axis.
        images = images[..., None]
    return images, labels


def load_split(name: str, split: str, *, data_dir: str | None = None) -> Split:
    """Loads a whole split of a TFDS data set into memory, without TensorFlow.

    Args:
        name: ``"digits"`` (jaxkd's builder, prepared into ``data_dir`` on first
            use from scikit-learn's bundled copy), or any TFDS name (``"cifar10"``,
            ``"cifar100"``, ...) already prepared in ``data_dir`` as array_record.
        split: a TFDS split, e.g. ``"train"``, ``"test"``, ``"train[:10%]"``.
        data_dir: TFDS data directory; defaults to TFDS's default
            (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).

    Returns:
        A :class:`Split` (``.images`` uint8 ``[N,H,W,C]``, ``.labels`` int32
        ``[N]``, ``.num_classes``); ``split["image"]``/``split["label"]`` also work.

    Raises:
        FileNotFoundError: the data set is not prepared in ``data_dir`` (the
            message says how to prepare it); nothing is downloaded.
        ValueError: a label lies outside ``[0, num_classes)``.
    """
    import tensorflow_datasets as tfds

    if name == "digits":
        builder = _digits_builder(data_dir)
        source = builder.as_data_source(split=split)
    else:
        builder = tfds.builder(name, data_dir=data_dir)
        try:
            source = builder.as_data_source(split=split)
        except (ValueError, NotImplementedError, FileNotFoundError) as e:
            # An unprepared builder fails here with a misleading message about file
            # formats; tell the user what is actually missing.
            if not builder.is_prepared():
                raise FileNotFoundError(
                    _prepare_instructions(name, _resolve_data_dir(data_dir))
                ) from e
            raise
    num_classes = int(builder.info.features["label"].num_classes)
    images, labels = _read_records(source)
    validate_labels(labels, num_classes)
    return Split(
        images=images,
        labels=labels.astype(np.int32),
        num_classes=num_classes,
        name=name,
        split=split,
    )


def subset_per_class(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of ``per_class`` examples of each class, drawn without replacement.

    Which examples are drawn depends only on ``(labels, per_class, seed)``.
    Every class present in ``labels`` gets exactly ``per_class`` examples.

    Returns:
        Sorted int64 indices into ``labels``, ``per_class * num_present_classes``.

    Raises:
        ValueError: ``per_class`` is not positive, or a class has fewer examples.
    """
    labels = np.asarray(labels)
    if per_class <= 0:
        raise ValueError(f"per_class must be positive, got {per_class}")
    classes, counts = np.unique(labels, return_counts=True)
    if np.any(counts < per_class):
        c = int(classes[np.argmax(counts < per_class)])
        raise ValueError(
            f"class {c} has {int(counts[classes == c][0])} examples, fewer than"
            f" per_class={per_class}"
        )
    perm = np.random.default_rng(seed).permutation(labels.shape[0])
    grouped = perm[np.argsort(labels[perm], kind="stable")]  # by class, random within
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    take = (starts[:, None] + np.arange(per_class)[None, :]).ravel()
    return np.sort(grouped[take]).astype(np.int64)


# --------------------------------------------------------------------------
# Normalization and augmentation
# --------------------------------------------------------------------------


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 ``[N, H, W, C]`` images scaled to [0, 1]."""
    x = np.asarray(images, dtype=np.float64) / 255.0
    axes = tuple(range(x.ndim - 1))
    return tuple(x.mean(axis=axes).tolist()), tuple(x.std(axis=axes).tolist())


def _channel_values(
    name: str, values: float | Sequence[float], channels: int, *, positive: bool
) -> tuple[float, ...]:
    """Checks a per-channel constant (``mean`` or ``std``) and returns it as a tuple of floats.

    ``values`` is one number or a sequence of 1 or ``channels`` finite numbers (``> 0`` when
    ``positive``); a single value applies to every channel.
    """
    if isinstance(values, (numbers.Real, np.generic)) or (
        isinstance(values, np.ndarray) and values.ndim == 0
    ):
        values = (values,)
    elif isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise ValueError(
            f"{name} must be a number or a sequence of 1 or {channels} numbers (one per channel),"
            f" got {name}={values!r}"
        )
    values = tuple(values)
    if len(values) not in (1, channels):
        expected = "1 entry" if channels == 1 else f"1 or {channels} entries"
        raise ValueError(
            f"{name} must have {expected} (one per channel of the {channels}-channel images),"
            f" got {len(values)}: {name}={values!r}"
        )
    check = check_positive if positive else check_number
    for i, value in enumerate(values):
        check(f"{name}[{i}]", value)
    return tuple(float(v) for v in values)


def normalize(
    images: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """uint8 ``[..., W, C]`` -> float32 ``(x / 255 - mean) / std`` per channel.

    Raises:
        ValueError: ``mean`` / ``std`` do not have 1 or ``C`` entries, an entry of ``mean`` is not
            finite, or an entry of ``std`` is not finite and ``> 0``.
    """
    images = np.asarray(images)
    w, c = images.shape[-2:] if images.ndim >= 2 else (1, images.shape[-1])
    return _Normalizer(mean, std, w, c)(images)


class _Normalizer:
    """:func:`normalize` with its per-row constants computed (and checked) once, for ``[..., w, c]``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], w: int, c: int):
        mean = np.broadcast_to(
            np.asarray(_channel_values("mean", mean, c, positive=False), dtype=np.float32), (c,)
        )
        std = np.broadcast_to(
            np.asarray(_channel_values("std", std, c, positive=True), dtype=np.float32), (c,)
        )
        # NumPy is slow to broadcast a length-C vector over a short last axis (its
        # inner loops run C long); apply it to whole [W * C] rows instead.
        self.scale = np.tile(1.0 / (255.0 * std), w)
        self.offset = np.tile(mean / std, w)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = images.astype(np.float32).reshape(-1, self.scale.shape[0])
        out *= self.scale
        out -= self.offset
        return out.reshape(images.shape)


class _Draws(NamedTuple):
    """The random draws of one batch's augmentation (one entry per example), see :func:`augment`."""

    pad: int
    dy: np.ndarray | None  # crop offsets, rows (None when pad == 0)
    dx: np.ndarray | None  # crop offsets, columns
    flip: np.ndarray | None  # bool, flip horizontally (crop_flip only)

    def rows(self, lo: int, hi: int) -> _Draws:
        """The draws of examples ``lo:hi`` only."""
        take = lambda a: None if a is None else a[lo:hi]  # noqa: E731
        return _Draws(self.pad, take(self.dy), take(self.dx), take(self.flip))


def _draw(mode: str, b: int, rng: np.random.Generator, pad: int | None) -> _Draws:
    """Draws the offsets (and flips) of ``b`` examples, in :func:`augment`'s order."""
    if pad is None:
        pad = 1 if mode == "shift" else 4
    dy = dx = flip = None
    if pad > 0:
        dy = rng.integers(0, 2 * pad + 1, size=b)
        dx = rng.integers(0, 2 * pad + 1, size=b)
    if mode == "crop_flip":
        flip = rng.random(b) < 0.5
    return _Draws(pad, dy, dx, flip)


def _apply(images: np.ndarray, draws: _Draws) -> np.ndarray:
    """Applies drawn offsets/flips to uint8 ``[B, H, W, C]`` (B = the draws' length)."""
    b, h, w, c = images.shape
    pad = draws.pad
    if draws.dy is not None:
        padded = np.zeros((b, h + 2 * pad, w + 2 * pad, c), dtype=images.dtype)
        padded[:, pad : pad + h, pad : pad + w] = images
        # All H x W windows of each padded image, as a view:
        # [B, 2 * pad + 1, 2 * pad + 1, C, H, W]; pick one window per image.
        windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(1, 2))
        out = np.ascontiguousarray(
            windows[np.arange(b), draws.dy, draws.dx].transpose(0, 2, 3, 1)
        )
    else:
        out = images.copy()
    if draws.flip is not None:
        out[draws.flip] = out[draws.flip, :, ::-1]
    return out


def augment(
    images: np.ndarray,
    mode: Augmentation,
    rng: np.random.Generator,
    *,
    pad: int | None = None,
) -> np.ndarray:
    """Random augmentation of a uint8 batch ``[B, H, W, C]`` (shape and dtype kept).

    Args:
        images: the batch.
        mode: ``"none"`` (returned unchanged), ``"shift"`` (zero-pad by ``pad``
            pixels, default 1, and crop back to ``H x W`` at a random offset: random
            translations by up to ``pad`` pixels, right for 8x8 digits), or
            ``"crop_flip"`` (zero-pad by ``pad``, default 4, random crop, then flip
            horizontally with probability 1/2: the CIFAR standard).
        rng: the NumPy generator that draws the offsets and flips (in this order:
            ``B`` row offsets, ``B`` column offsets, ``B`` flips).
        pad: padding in pixels (see ``mode``): None (the default) or an integer ``>= 0``.

    Raises:
        ValueError: ``mode`` is not one of :data:`AUGMENTATIONS`, or ``pad`` is not None or an
            integer ``>= 0``.
    """
    check_choice("mode", mode, AUGMENTATIONS)
    if pad is not None:
        check_int("pad", pad, low=0)
    if mode == "none":
        return images
    return _apply(images, _draw(mode, images.shape[0], rng, pad))


# --------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------


class Position(NamedTuple):
    """Where a :class:`Loader` is: the next batch is batch ``step`` of ``epoch``."""

    epoch: int
    step: int


# The entries of `Loader.get_state()` besides the position: a state saved by a loader
# with other values of these would give other batches, so `set_state` refuses it.
_STATE_CHECKS = ("seed", "batch_size", "num_examples")


class _BatchMaker:
    """The pure function ``(epoch, step) -> this host's part of the batch``.

    It is what every Grain element is made by (``MapDataset.map_with_index``); it is picklable,
    so Grain worker processes get their own copy.
    """

    def __init__(
        self, images, labels, *, batch_size, mean, std, shuffle, seed, drop_remainder,
        augment, pad, steps_per_epoch, process_index, process_count, with_index=False,
    ):
        self.images, self.labels = images, labels
        self.with_index = with_index
        self.batch_size = batch_size
        self.shuffle, self.seed, self.drop_remainder = shuffle, seed, drop_remainder
        self.augment, self.pad, self.steps_per_epoch = augment, pad, steps_per_epoch
        self.local_batch_size = batch_size // process_count
        self.lo = process_index * self.local_batch_size  # this host's rows: lo:lo + local
        self.normalize = _Normalizer(mean, std, *images.shape[2:])
        self._init_cache()

    def _init_cache(self):
        # Grain's reader threads may build batches of two epochs at once: keep two orders.
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_orders"], state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_cache()

    def epoch_order(self, epoch: int) -> np.ndarray:
        with self._lock:
            order = self._orders.get(epoch)
        if order is not None:
            return order
        n = self.labels.shape[0]
        if self.shuffle:
            order = np.random.default_rng([self.seed, 0, epoch]).permutation(n)
        else:
            order = np.arange(n)
        order.flags.writeable = False
        with self._lock:
            if len(self._orders) >= 2:
                del self._orders[min(self._orders)]
            self._orders[epoch] = order
        return order

    def batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        b, local, lo = self.batch_size, self.local_batch_size, self.lo
        rows = self.epoch_order(epoch)[step * b : (step + 1) * b]  # the global batch
        real = rows.shape[0]  # < b only for the last batch without drop_remainder
        idx = rows[lo : lo + local]  # this host's rows of it
        images = self.images[idx]
        if self.augment != "none":
            # Drawn for the whole global batch, so each example's draw does not depend on
            # how many hosts share the batch.
            rng = np.random.default_rng([self.seed, 1, epoch, step])
            draws = _draw(self.augment, real, rng, self.pad)
            images = _apply(images, draws.rows(lo, lo + local))
        out = {"image": self.normalize(images), "label": self.labels[idx]}
        if self.with_index:
            out["index"] = idx.astype(np.int32)
        if not self.drop_remainder:
            have = idx.shape[0]
            mask = np.zeros((local,), dtype=bool)
            mask[:have] = True
            if have < local:
                out["image"] = np.concatenate(
                    [out["image"], np.zeros((local - have, *images.shape[1:]), np.float32)]
                )
                out["label"] = np.concatenate(
                    [out["label"], np.zeros((local - have,), np.int32)]
                )
                if self.with_index:
                    out["index"] = np.concatenate([out["index"], np.zeros((local - have,), np.int32)])
            out["mask"] = mask
        return out

    def __call__(self, index: int, _step_in_epoch: int) -> dict[str, np.ndarray]:
        """Grain's ``map_with_index`` transform: element ``index`` is global batch ``index``."""
        return self.batch(*divmod(index, self.steps_per_epoch))


class Loader:
    """Batches in-memory arrays through a Grain pipeline; reproducible, resumable, per-host.

    Iterating (``next(loader)``, ``for batch in loader``) yields
    ``{"image": float32 [b,H,W,C], "label": int32 [b]}`` dicts (plus ``"mask": bool [b]``
    when ``drop_remainder=False``) from :attr:`position` on, advancing it, until ``num_epochs``
    epochs are done (forever if ``num_epochs is None``).  ``b = batch_size // process_count``.

    Randomness.  The order of epoch ``e`` is ``default_rng([seed, 0, e]).permutation(N)``
    (identity when ``shuffle=False``); batch ``(e, s)`` (examples ``s * batch_size`` to
    ``(s + 1) * batch_size`` of that order) is augmented with ``default_rng([seed, 1, e, s])``.
    So every batch is a pure function of the arguments and its position (:meth:`batch`), and
    a loader restored to a position (``start=``, :meth:`seek`, :meth:`set_state`) yields
    bitwise the batches an uninterrupted loader would have.

    Grain.  :attr:`dataset` is a ``grain.MapDataset`` whose element ``k`` is global batch
    ``divmod(k, len(loader))`` (``MapDataset.range(steps).repeat(num_epochs)
    .map_with_index(...)``); iteration goes through its Grain iterator (optionally with reader
    threads, ``num_threads``, or worker processes, ``worker_count``), whose checkpoint state
    ``{"next_index": k}`` is the position.  Batches are built whole (one fancy-index gather,
    vectorized augmentation and normalization), not example by example: see
    ``benchmarks/data_pipeline.py`` for why.

    Several hosts.  ``batch_size`` is the global batch.  Process ``p`` of ``P``
    (``process_index``, ``process_count``; default ``jax.process_index()``,
    ``jax.process_count()``) gets rows ``p * b : (p + 1) * b`` of every global batch, so the
    batches of processes ``0 .. P-1`` concatenated in that order are exactly the batch one
    process would get with ``process_count=1`` (images, labels, augmentation and mask alike),
    and a state saved with one process count restores with another.  ``batch_size`` must be
    divisible by ``process_count``.

    Args:
        images: uint8 ``[N, H, W, C]``.
        labels: integer ``[N]`` (an integer dtype: float labels are refused, not
            truncated).
        batch_size: examples per global batch, an integer ``>= 1``.
        mean, std: per-channel normalization (see :data:`NORMALIZATION`): 1 or
            ``C`` finite numbers each, every ``std`` entry ``> 0``.
        shuffle: reshuffle every epoch (training) or keep the order (eval).
        seed: seed of the shuffling and augmentation, an integer ``>= 0``.
        drop_remainder: drop the last partial batch (training).  When False,
            the last batch is padded to ``batch_size`` and every batch has a
            ``"mask"`` (True for real examples).
        num_epochs: epochs to run (an integer ``>= 1``), counted from epoch 0 (a
            loader started at epoch 3 with ``num_epochs=5`` runs epochs 3 and 4);
            None: forever.
        augment: ``"none"``, ``"shift"`` or ``"crop_flip"`` (see :func:`augment`).
        pad: augmentation padding, an integer ``>= 0`` (default None: 1 for
            shift, 4 for crop_flip).
        num_classes: if given, labels are checked to lie in ``[0, num_classes)``.
        start: the position to start from (default ``Position(0, 0)``).
        process_index, process_count: this host's index and the number of hosts (see above);
            None: ``jax.process_index()`` / ``jax.process_count()``.
        num_threads: Grain reader threads that build batches ahead of the consumer
            (``ReadOptions.num_threads``); 0 (default): built on demand in the calling thread.
        worker_count: Grain worker processes that build batches ahead (``mp_prefetch``); 0
            (default): none.  Call :meth:`close` (or use ``with``) to stop them.
        with_index: also yield ``"index": int32 [b]``, each example's row in ``images`` (what
            CRD's memory bank is indexed by; padding rows get 0 and are masked).

    Raises:
        ValueError: an argument is outside what is described above (the message
            names it, the expectation and the value given).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        batch_size: int,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        shuffle: bool = True,
        seed: int = 0,
        drop_remainder: bool = True,
        num_epochs: int | None = 1,
        augment: Augmentation = "none",
        pad: int | None = None,
        num_classes: int | None = None,
        start: Position | tuple[int, int] = Position(0, 0),
        process_index: int | None = None,
        process_count: int | None = None,
        num_threads: int = 0,
        worker_count: int = 0,
        with_index: bool = False,
    ):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels shape {labels.shape} does not match {images.shape[0]} images"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels must have an integer dtype (class indices), got labels of dtype"
                f" {labels.dtype}; float labels would be silently truncated"
            )
        int32 = np.iinfo(np.int32)
        if labels.size and (labels.min() < int32.min or labels.max() > int32.max):
            raise ValueError(
                f"labels must fit in int32, got labels in [{labels.min()}, {labels.max()}]"
            )
        if num_classes is not None:
            validate_labels(labels, num_classes)
        channels = images.shape[-1]
        self.mean = _channel_values("mean", mean, channels, positive=False)
        self.std = _channel_values("std", std, channels, positive=True)
        check_choice("augment", augment, AUGMENTATIONS)
        if pad is not None:
            check_int("pad", pad, low=0)
        self._set_iteration(
            images.shape[0], batch_size=batch_size, shuffle=shuffle, seed=seed, drop_remainder=drop_remainder,
            num_epochs=num_epochs, process_index=process_index, process_count=process_count,
            num_threads=num_threads, worker_count=worker_count,
        )
        self.images = images
        self.labels = labels.astype(np.int32)
        self.augment = augment
        self.pad = None if pad is None else int(pad)
        self._maker = _BatchMaker(
            self.images, self.labels, batch_size=self.batch_size, mean=self.mean,
            std=self.std, shuffle=shuffle, seed=self.seed, drop_remainder=drop_remainder,
            augment=augment, pad=self.pad, steps_per_epoch=self.steps_per_epoch,
            process_index=self.process_index, process_count=self.process_count, with_index=bool(with_index),
        )
        self._start(start)

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
        return int(self.images.shape[0])

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

    def __iter__(self) -> Loader:
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

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
