"""The experiment's data for data sets too large to hold in memory (``imagenet2012``): streamed from TFDS.

``experiments/distill.py`` loads small data sets (digits, CIFAR) whole into memory; for a data set named in
:data:`STREAMED` it calls :func:`load` instead, which opens the TFDS split as a random-access source
(:func:`jaxkd.data.imagenet_source`, array_record in ``data_dir``, no TensorFlow) and reads nothing yet.
Training batches come from a :class:`jaxkd.data.ImageNetLoader` (the standard ImageNet augmentation when
``augment`` is not ``"none"``: random resized crop ``image_size`` + flip; the eval transform otherwise),
evaluation batches from a fresh eval loader (resize ``resize_size`` + center crop ``image_size``) at each
evaluation, so neither split is ever materialized.

Not supported on a streamed data set (refused with a ``ValueError`` naming the setting): ``labels_per_class``
(a class-balanced subset needs every label first) and methods with a held-out meta set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jaxkd import data

#: Data sets the experiment streams (everything else is loaded whole with ``jaxkd.data.load_split``).
STREAMED = ("imagenet2012",)
#: Grain reader threads decoding and augmenting training batches ahead of the step (JPEG decoding and
#: Pillow's resizing release the GIL).
TRAIN_THREADS = 8


@dataclasses.dataclass(frozen=True)
class StreamedSplit:
    """A split read on demand: the TFDS data source, its class count and names."""

    source: Sequence
    num_classes: int
    name: str
    split: str

    def __len__(self) -> int:
        return len(self.source)


class EvalBatches:
    """The evaluation split's batches, re-read at each iteration (a fresh single-epoch eval loader)."""

    def __init__(self, split: StreamedSplit, *, batch_size: int, image_size: int, resize_size: int):
        self.split, self.batch_size = split, batch_size
        self.image_size, self.resize_size = image_size, resize_size

    @property
    def num_examples(self) -> int:
        return len(self.split)

    def __iter__(self):
        loader = data.ImageNetLoader(
            self.split.source, batch_size=self.batch_size, train=False, image_size=self.image_size,
            resize_size=self.resize_size, num_classes=self.split.num_classes, num_epochs=1,
            num_threads=TRAIN_THREADS,
        )
        with loader:
            yield from loader


def load(cfg: Any) -> tuple[StreamedSplit, StreamedSplit, EvalBatches, tuple, tuple]:
    """``(train, student_train, test_batches, mean, std)`` for ``experiments.distill.Data``."""
    if cfg.labels_per_class is not None:
        raise ValueError(
            f"labels_per_class={cfg.labels_per_class} is not supported on the streamed data set {cfg.dataset!r} "
            "(a class-balanced subset needs every label first); set labels_per_class=None"
        )
    train = StreamedSplit(*data.imagenet_source(cfg.train_split, data_dir=cfg.data_dir, name=cfg.dataset),
                          cfg.dataset, cfg.train_split)
    test = StreamedSplit(*data.imagenet_source(cfg.test_split, data_dir=cfg.data_dir, name=cfg.dataset),
                         cfg.dataset, cfg.test_split)
    mean, std = data.NORMALIZATION[cfg.dataset]
    batches = EvalBatches(test, batch_size=cfg.eval_batch_size, image_size=cfg.image_size,
                          resize_size=cfg.resize_size)
    return train, train, batches, mean, std


def check_supported(cfg: Any, run_methods: dict) -> None:
    """Refuses methods that hold out a meta set (TGeo-KD): the hold-out needs the split in memory."""
    meta = [name for name, m in run_methods.items() if m.needs.meta_prefix is not None]
    if meta:
        raise ValueError(
            f"methods {meta} hold out a meta set, which is not supported on the streamed data set {cfg.dataset!r}"
        )


def train_loader(cfg: Any, split: StreamedSplit, seed: int, *, with_index: bool,
                 batch_size: int) -> data.ImageNetLoader:
    """The shuffled, endless, resumable training loader of a streamed split."""
    return data.ImageNetLoader(
        split.source, batch_size=batch_size, train=cfg.augment != "none", image_size=cfg.image_size,
        resize_size=cfg.resize_size, shuffle=True, drop_remainder=True, seed=seed, num_epochs=None,
        num_classes=split.num_classes, with_index=with_index, num_threads=TRAIN_THREADS,
    )


def sample_batch(cfg: Any, split: StreamedSplit) -> dict:
    """A batch of the training split's first rows (eval transform), to initialize models from."""
    return data.ImageNetLoader(
        split.source, batch_size=min(cfg.batch_size, len(split)), train=False, image_size=cfg.image_size,
        resize_size=cfg.resize_size, num_classes=split.num_classes, drop_remainder=True,
    ).batch((0, 0))
