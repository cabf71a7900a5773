"""Host-side NumPy input pipeline: load a TFDS split into memory, batch it.

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
    :class:`Loader` iterates over in-memory arrays.  Everything random is a pure
    function of ``(seed, epoch)`` (the shuffling order) and
    ``(seed, epoch, step)`` (the augmentation of one batch), so a run resumes
    exactly from a :class:`Position` (``loader.position`` / ``start=``).
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
from collections.abc import Iterator, Sequence
from typing import Literal, NamedTuple

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
    mean = np.broadcast_to(
        np.asarray(_channel_values("mean", mean, c, positive=False), dtype=np.float32), (c,)
    )
    std = np.broadcast_to(
        np.asarray(_channel_values("std", std, c, positive=True), dtype=np.float32), (c,)
    )
    # NumPy is slow to broadcast a length-C vector over a short last axis (its
    # inner loops run C long); apply it to whole [W * C] rows instead.
    out = images.astype(np.float32).reshape(-1, w * c)
    out *= np.tile(1.0 / (255.0 * std), w)
    out -= np.tile(mean / std, w)
    return out.reshape(images.shape)


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
        rng: the NumPy generator that draws the offsets and flips.
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
    if pad is None:
        pad = 1 if mode == "shift" else 4
    b, h, w, c = images.shape
    if pad > 0:
        padded = np.zeros((b, h + 2 * pad, w + 2 * pad, c), dtype=images.dtype)
        padded[:, pad : pad + h, pad : pad + w] = images
        dy = rng.integers(0, 2 * pad + 1, size=b)
        dx = rng.integers(0, 2 * pad + 1, size=b)
        # All H x W windows of each padded image, as a view:
        # [B, 2 * pad + 1, 2 * pad + 1, C, H, W]; pick one window per image.
        windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(1, 2))
        out = np.ascontiguousarray(windows[np.arange(b), dy, dx].transpose(0, 2, 3, 1))
    else:
        out = images.copy()
    if mode == "crop_flip":
        flip = rng.random(b) < 0.5
        out[flip] = out[flip, :, ::-1]
    return out


# --------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------


class Position(NamedTuple):
    """Where a :class:`Loader` is: the next batch is batch ``step`` of ``epoch``."""

    epoch: int
    step: int


class Loader:
    """Batches in-memory arrays; reproducible and resumable.

    Iterating yields ``{"image": float32 [B,H,W,C], "label": int32 [B]}`` dicts
    (plus ``"mask": bool [B]`` when ``drop_remainder=False``) from
    :attr:`position` on, advancing it, until ``num_epochs`` epochs are done
    (forever if ``num_epochs is None``).  The order of epoch ``e`` is
    ``default_rng([seed, 0, e]).permutation(N)`` (identity when
    ``shuffle=False``) and batch ``(e, s)`` is augmented with
    ``default_rng([seed, 1, e, s])``, so the batches depend only on the
    arguments and the position: ``Loader(..., start=pos)`` repeats exactly what
    a loader that was at ``pos`` would have yielded.

    Args:
        images: uint8 ``[N, H, W, C]``.
        labels: integer ``[N]`` (an integer dtype: float labels are refused, not
            truncated).
        batch_size: examples per batch, an integer ``>= 1``.
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
        check_int("batch_size", batch_size, low=1)
        channels = images.shape[-1]
        self.mean = _channel_values("mean", mean, channels, positive=False)
        self.std = _channel_values("std", std, channels, positive=True)
        check_int("seed", seed, low=0)
        if num_epochs is not None:
            check_int("num_epochs", num_epochs, low=1)
        check_choice("augment", augment, AUGMENTATIONS)
        if pad is not None:
            check_int("pad", pad, low=0)
        self.images = images
        self.labels = labels.astype(np.int32)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_remainder = drop_remainder
        self.num_epochs = None if num_epochs is None else int(num_epochs)
        self.augment = augment
        self.pad = None if pad is None else int(pad)
        n = images.shape[0]
        if drop_remainder:
            self.steps_per_epoch = n // self.batch_size
        else:
            self.steps_per_epoch = math.ceil(n / self.batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{n} examples give no full batch of {batch_size} with drop_remainder"
            )
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._position = Position(0, 0)
        self.seek(start)

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.steps_per_epoch

    @property
    def num_examples(self) -> int:
        return int(self.images.shape[0])

    @property
    def position(self) -> Position:
        """Position of the next batch to be yielded (normalized: step < steps_per_epoch)."""
        return self._position

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
        epoch += step // self.steps_per_epoch
        step %= self.steps_per_epoch
        self._position = Position(epoch, step)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order in which epoch ``epoch`` visits the examples."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        n = self.num_examples
        if self.shuffle:
            order = np.random.default_rng([self.seed, 0, epoch]).permutation(n)
        else:
            order = np.arange(n)
        self._order_cache = (epoch, order)
        return order

    def batch(self, position: Position | tuple[int, int]) -> dict[str, np.ndarray]:
        """The batch at ``position`` (pure: does not move the loader)."""
        epoch, step = position
        order = self.epoch_order(epoch)
        idx = order[step * self.batch_size : (step + 1) * self.batch_size]
        images = self.images[idx]
        rng = np.random.default_rng([self.seed, 1, epoch, step])
        images = augment(images, self.augment, rng, pad=self.pad)
        out = {
            "image": normalize(images, self.mean, self.std),
            "label": self.labels[idx],
        }
        if not self.drop_remainder:
            real = idx.shape[0]
            missing = self.batch_size - real
            mask = np.ones((self.batch_size,), dtype=bool)
            if missing:
                mask[real:] = False
                out["image"] = np.concatenate(
                    [out["image"], np.zeros((missing, *out["image"].shape[1:]), np.float32)]
                )
                out["label"] = np.concatenate([out["label"], np.zeros((missing,), np.int32)])
            out["mask"] = mask
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while self.num_epochs is None or self._position.epoch < self.num_epochs:
            batch = self.batch(self._position)
            # Advance before yielding: while the consumer holds batch (e, s),
            # `position` already names the batch that comes next (the resume point).
            self.seek((self._position.epoch, self._position.step + 1))
            yield batch
