"""Image data sources: a whole TFDS split in memory, without TensorFlow and without the network.

:func:`load_split` reads a whole split into memory as a :class:`Split` (uint8 images ``[N, H, W, C]``,
int32 labels ``[N]``, ``num_classes``).  ``"digits"`` is jaxkd's own builder
(:mod:`jaxkd.data.images.digits`), prepared on first use from the copy that ships with scikit-learn.  Any
other name goes through ``tfds.builder(name, data_dir=...).as_data_source(split)`` and must already be
prepared in ``data_dir`` in the ``array_record`` format; jaxkd never downloads, it raises
:class:`FileNotFoundError` with instructions.  :func:`subset_per_class` draws a class-balanced subset of a
split (:meth:`Split.subset` takes it).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Sequence

import numpy as np

from jaxkd.checks import check_int, check_label_values

__all__ = ["Split", "data_source", "load_split", "subset_per_class", "validate_labels"]


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

    from jaxkd.data.images.digits import Digits

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
    source, num_classes = data_source(name, split, data_dir=data_dir)
    images, labels = _read_records(source)
    validate_labels(labels, num_classes)
    return Split(
        images=images,
        labels=labels.astype(np.int32),
        num_classes=num_classes,
        name=name,
        split=split,
    )


def data_source(name: str, split: str, *, data_dir: str | None = None) -> tuple[Sequence[dict], int]:
    """``(source, num_classes)``: a split of a TFDS data set as a random-access data source (records decoded
    on access, nothing read before), without TensorFlow; what :func:`load_split` reads whole and
    :class:`jaxkd.data.ImageNetLoader` streams.

    Raises:
        FileNotFoundError: the data set is not prepared in ``data_dir`` (the message says how to prepare
            it); nothing is downloaded.
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
    return source, int(builder.info.features["label"].num_classes)


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
