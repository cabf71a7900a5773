"""ImageNet (TFDS ``imagenet2012``) streamed from a ``data_dir``: the standard augmentation, through Grain.

:func:`imagenet_source` opens a split of ``imagenet2012`` (or any TFDS image classification data set whose
images differ in size) prepared as array_record in ``data_dir``, as a random-access TFDS data source: nothing
is read until a batch asks for its rows, and TensorFlow is never imported. :class:`ImageNetLoader` turns such
a source into batches with the standard ImageNet pipeline of torchvision's reference recipe (the one of
torchdistill's ImageNet configurations):

* train (``train=True``): ``RandomResizedCrop(image_size, scale=(0.08, 1), ratio=(3/4, 4/3))`` — a box of a
  uniformly drawn fraction of the area and a log-uniformly drawn aspect ratio, up to 10 tries, else the
  central crop of the clamped ratio (torchvision's ``RandomResizedCrop.get_params``), resized bilinearly —
  then ``RandomHorizontalFlip(0.5)``;
* eval (``train=False``): ``Resize(resize_size)`` (shorter side to 256, the longer ``int(256 · long / short)``)
  then ``CenterCrop(image_size)`` (offsets ``round((size - 224) / 2)``);
* then ``ToTensor`` + ``Normalize`` with the ImageNet mean and std (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`).

Images are decoded (JPEG, by TFDS on the host) and resized with Pillow's bilinear filter, as torchvision does
on PIL images. The draws of example ``r`` of global batch ``(epoch, step)`` come from
``default_rng([seed, 1, epoch, step, r])`` and the order of an epoch is ``default_rng([seed, 0, epoch])
.permutation(N)``, so every batch is a pure function of its position: loaders resume exactly
(``get_state``/``set_state``, ``start=``), and several processes each read their own rows of every global
batch, drawing what one process would draw. Batches are ``{"image": float32 [b, S, S, 3], "label": int32
[b]}`` (plus ``"mask"`` without ``drop_remainder`` and ``"index"`` with ``with_index``), as
:class:`jaxkd.data.Loader`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxkd.batch import IMAGE, INDEX, LABEL, MASK
from jaxkd.checks import check_int, check_number
from jaxkd.data.grain_loader import GrainLoader, Position
from jaxkd.data.images.loader import EpochOrders
from jaxkd.data.images.normalization import IMAGENET_MEAN, IMAGENET_STD, _channel_values

__all__ = ["ImageNetLoader", "center_crop_box", "imagenet_source", "random_resized_crop_box", "resized_size"]


def imagenet_source(split: str, *, data_dir: str | None = None, name: str = "imagenet2012") -> tuple[Sequence, int]:
    """``(source, num_classes)``: the split ``split`` of TFDS ``name`` as a random-access data source (records
    ``{"image": uint8 [H, W, 3], "label": int, ...}``, decoded on access), and the number of classes.

    Raises:
        FileNotFoundError: the data set is not prepared in ``data_dir`` (the message says how); nothing is
            downloaded.
    """
    from jaxkd.data.images.sources import data_source

    return data_source(name, split, data_dir=data_dir)


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator, *,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of torchvision's ``RandomResizedCrop.get_params`` for an image ``height x width``:
    up to 10 draws of ``area · U(scale)`` and ``exp(U(log ratio))``; the first box that fits is placed
    uniformly; else the central crop of the image with its aspect ratio clamped to ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's ``Resize(size)`` output ``(h, w)`` for an int ``size``: the shorter side becomes ``size``,
    the longer ``int(size · long / short)``."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def center_crop_box(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's ``CenterCrop(size)`` offsets ``(top, left)`` (``int(round((H - size) / 2))``)."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:  # a grey-scale image, as PIL's convert("RGB") would give it
        image = np.repeat(image, 3, axis=-1)
    return image


def _resize(image: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """The box ``(top, left, h, w)`` of ``image`` resized to ``size = (h, w)`` with Pillow's bilinear filter
    (antialiased when shrinking, as torchvision's resize of a PIL image)."""
    from PIL import Image

    top, left, h, w = box
    crop = Image.fromarray(image[top : top + h, left : left + w])
    if (h, w) == tuple(size):
        return np.asarray(crop)
    return np.asarray(crop.resize((size[1], size[0]), Image.BILINEAR))


class _ImageNetBatchMaker(EpochOrders):
    """The pure function ``(epoch, step) -> this process's part of the batch`` (picklable for Grain workers)."""

    def __init__(self, source, num_rows, *, batch_size, train, image_size, resize_size, scale, ratio, mean, std,
                 shuffle, seed, drop_remainder, steps_per_epoch, process_index, process_count, with_index):
        self.source, self.num_rows = source, num_rows
        self.batch_size, self.train = batch_size, train
        self.image_size, self.resize_size, self.scale, self.ratio = image_size, resize_size, scale, ratio
        self.scale_px = (1.0 / (255.0 * np.asarray(std, np.float32))).astype(np.float32)
        self.offset = (np.asarray(mean, np.float32) / np.asarray(std, np.float32)).astype(np.float32)
        self.shuffle, self.seed, self.drop_remainder = shuffle, seed, drop_remainder
        self.steps_per_epoch, self.with_index = steps_per_epoch, with_index
        self.local_batch_size = batch_size // process_count
        self.lo = process_index * self.local_batch_size
        self._init_cache()

    def transform(self, image: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """One decoded uint8 image -> the normalized float32 ``[S, S, 3]`` crop (``rng``: train draws)."""
        image = _rgb(image)
        height, width = image.shape[:2]
        size = (self.image_size, self.image_size)
        if self.train:
            box = random_resized_crop_box(height, width, rng, scale=self.scale, ratio=self.ratio)
            out = _resize(image, box, size)
            if rng.random() < 0.5:
                out = out[:, ::-1]
        else:
            rh, rw = resized_size(height, width, self.resize_size)
            resized = _resize(image, (0, 0, height, width), (rh, rw))
            top, left = center_crop_box(rh, rw, self.image_size)
            out = resized[top : top + self.image_size, left : left + self.image_size]
        out = out.astype(np.float32)
        out *= self.scale_px
        out -= self.offset
        return out

    def batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        b, local, lo = self.batch_size, self.local_batch_size, self.lo
        rows = self.epoch_order(epoch)[step * b : (step + 1) * b]
        idx = rows[lo : lo + local]
        records = [self.source[int(i)] for i in idx]  # random access: only this batch's rows are read
        images = np.zeros((local, self.image_size, self.image_size, 3), np.float32)
        labels = np.zeros((local,), np.int32)
        for k, record in enumerate(records):
            rng = np.random.default_rng([self.seed, 1, epoch, step, lo + k]) if self.train else None
            images[k] = self.transform(record["image"], rng)
            labels[k] = int(record["label"])
        out = {IMAGE: images, LABEL: labels}
        if self.with_index:
            out[INDEX] = np.zeros((local,), np.int32)
            out[INDEX][: idx.shape[0]] = idx
        if not self.drop_remainder:
            mask = np.zeros((local,), dtype=bool)
            mask[: idx.shape[0]] = True
            out[MASK] = mask
        return out

    def __call__(self, index: int, _step_in_epoch: int) -> dict[str, np.ndarray]:
        return self.batch(*divmod(index, self.steps_per_epoch))


def _pair(name: str, value: Any, *, low: float, high: float | None) -> tuple[float, float]:
    """A ``(lo, hi)`` range of finite numbers with ``low < lo <= hi`` (and ``hi <= high``)."""
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high) of numbers, got {name}={value!r}") from None
    check_number(f"{name}[0]", lo)
    check_number(f"{name}[1]", hi)
    if not (low < lo <= hi and (high is None or hi <= high)):
        bound = f"<= {high}" if high is not None else "finite"
        raise ValueError(f"{name} must satisfy {low} < low <= high ({bound}), got {name}={value!r}")
    return float(lo), float(hi)


class ImageNetLoader(GrainLoader):
    """Batches of a TFDS image source (``imagenet2012``) with the standard ImageNet augmentation, streamed.

    Rows are read, decoded and augmented when their batch is made (Grain reader threads ``num_threads`` or
    worker processes ``worker_count`` make them ahead); only the epoch's order (``N`` int64) is held.
    Iteration, positions, resume and several processes are :class:`~jaxkd.data.grain_loader.GrainLoader`'s,
    as for :class:`jaxkd.data.Loader` (see the module docstring for the randomness).

    Args:
        source: a random-access sequence of records ``{"image": uint8 [H, W, 3] (or [H, W, 1]), "label": int}``
            (:func:`imagenet_source`).
        batch_size: examples per global batch, an integer ``>= 1``.
        train: the train augmentation (random resized crop + flip) or the eval one (resize + center crop).
        image_size: the crop's side (224), an integer ``>= 1``.
        resize_size: eval only, the shorter side before the center crop (256), an integer ``>= image_size``.
        scale, ratio: the random resized crop's area fraction in ``(0, 1]`` and aspect-ratio range.
        mean, std: per-channel normalization (default: ImageNet's).
        shuffle: reshuffle every epoch; default: ``train``.
        drop_remainder: drop the last partial batch; default: ``train`` (without it, the last batch is padded
            with zero images, label 0 and ``mask`` False).
        seed, num_epochs, start, process_index, process_count, num_threads, worker_count, with_index: as
            :class:`jaxkd.data.Loader`'s.
        num_classes: if given, every label read is checked to lie in ``[0, num_classes)``.

    Raises:
        ValueError: an argument is outside what is described above (named with its value), or (when a
            batch is made) a label is outside ``[0, num_classes)``.
    """

    def __init__(
        self,
        source: Sequence,
        *,
        batch_size: int,
        train: bool,
        image_size: int = 224,
        resize_size: int = 256,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        shuffle: bool | None = None,
        seed: int = 0,
        drop_remainder: bool | None = None,
        num_epochs: int | None = 1,
        num_classes: int | None = None,
        start: Position | tuple[int, int] = Position(0, 0),
        process_index: int | None = None,
        process_count: int | None = None,
        num_threads: int = 0,
        worker_count: int = 0,
        with_index: bool = False,
    ):
        image_size = check_int("image_size", image_size, low=1)
        resize_size = check_int("resize_size", resize_size, low=1)
        if not train and resize_size < image_size:
            raise ValueError(
                f"resize_size must be >= image_size (the center crop is taken from the resized image), got "
                f"resize_size={resize_size}, image_size={image_size}"
            )
        scale = _pair("scale", scale, low=0.0, high=1.0)
        ratio = _pair("ratio", ratio, low=0.0, high=None)
        mean = _channel_values("mean", mean, 3, positive=False)
        std = _channel_values("std", std, 3, positive=True)
        if num_classes is not None:
            num_classes = check_int("num_classes", num_classes, low=1)
        num_rows = len(source)
        if num_rows == 0:
            raise ValueError("the source is empty")
        shuffle = bool(train) if shuffle is None else shuffle
        drop_remainder = bool(train) if drop_remainder is None else drop_remainder
        self._set_iteration(
            num_rows, batch_size=batch_size, shuffle=shuffle, seed=seed, drop_remainder=drop_remainder,
            num_epochs=num_epochs, process_index=process_index, process_count=process_count,
            num_threads=num_threads, worker_count=worker_count,
        )
        self.source, self.train, self.num_classes = source, bool(train), num_classes
        self.image_size, self.resize_size = image_size, resize_size
        self._num_rows = num_rows
        maker = _ImageNetBatchMaker(
            source, num_rows, batch_size=self.batch_size, train=self.train, image_size=image_size,
            resize_size=resize_size, scale=scale, ratio=ratio, mean=mean, std=std, shuffle=shuffle,
            seed=self.seed, drop_remainder=drop_remainder, steps_per_epoch=self.steps_per_epoch,
            process_index=self.process_index, process_count=self.process_count, with_index=bool(with_index),
        )
        self._maker = _CheckedLabels(maker, num_classes) if num_classes is not None else maker
        self._start(start)

    @property
    def num_examples(self) -> int:
        return self._num_rows


class _CheckedLabels:
    """A batch maker whose batches' labels are checked against ``num_classes`` (rows are only read then)."""

    def __init__(self, maker: _ImageNetBatchMaker, num_classes: int):
        self.maker, self.num_classes = maker, num_classes

    def epoch_order(self, epoch: int) -> np.ndarray:
        return self.maker.epoch_order(epoch)

    def batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        out = self.maker.batch(epoch, step)
        labels = out[LABEL] if MASK not in out else out[LABEL][out[MASK]]
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, num_classes={self.num_classes}), got labels in "
                f"[{labels.min()}, {labels.max()}] in batch (epoch={epoch}, step={step})"
            )
        return out

    def __call__(self, index: int, _step_in_epoch: int) -> dict[str, np.ndarray]:
        return self.batch(*divmod(index, self.maker.steps_per_epoch))
