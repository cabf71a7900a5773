"""The image :class:`Loader`: batches of in-memory images and labels through Grain, reproducible and resumable.

:class:`Loader` is a Grain pipeline over in-memory arrays: a ``grain.MapDataset`` whose element ``k`` is
the whole batch ``k`` (gathered, augmented and normalized in one vectorized NumPy call), iterated by
Grain's iterator (:class:`jaxkd.data.grain_loader.GrainLoader`).  Everything random is a pure function of
``(seed, epoch)`` (the shuffling order) and ``(seed, epoch, step)`` (the augmentation of one batch), so a
run resumes exactly from a :class:`~jaxkd.data.grain_loader.Position` (``loader.position`` / ``start=``)
or from the JSON dict of ``loader.get_state()`` / ``loader.set_state()``.  With several JAX processes
each reads its own equal slice of every global batch.  Each batch is
``{"image": float32 [B, H, W, C], "label": int32 [B]}``; with ``drop_remainder=False`` (evaluation)
every batch also carries ``"mask": bool [B]`` and the last partial batch is padded to ``B`` (zero
images, label 0, mask False), so one compiled eval step serves all batches.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from jaxkd.batch import IMAGE, INDEX, LABEL, MASK
from jaxkd.checks import check_choice, check_int
from jaxkd.data.grain_loader import GrainLoader, Position
from jaxkd.data.images.augmentation import AUGMENTATIONS, Augmentation, _apply, _draw
from jaxkd.data.images.normalization import _channel_values, _Normalizer
from jaxkd.data.images.sources import validate_labels

__all__ = ["Loader"]


class EpochOrders:
    """The shuffled row order of each epoch, cached for the two epochs Grain's reader threads may build batches
    of at once; picklable (the cache and its lock are rebuilt), so Grain worker processes get their own copy.
    Subclasses set ``num_rows``, ``shuffle`` and ``seed`` and call :meth:`_init_cache`."""

    num_rows: int
    shuffle: bool
    seed: int

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
        if self.shuffle:
            order = np.random.default_rng([self.seed, 0, epoch]).permutation(self.num_rows)
        else:
            order = np.arange(self.num_rows)
        order.flags.writeable = False
        with self._lock:
            if len(self._orders) >= 2:
                del self._orders[min(self._orders)]
            self._orders[epoch] = order
        return order


class _BatchMaker(EpochOrders):
    """The pure function ``(epoch, step) -> this host's part of the batch``.

    It is what every Grain element is made by (``MapDataset.map_with_index``); it is picklable,
    so Grain worker processes get their own copy.
    """

    def __init__(
        self, images, labels, *, batch_size, mean, std, shuffle, seed, drop_remainder,
        augment, pad, steps_per_epoch, process_index, process_count, with_index=False,
    ):
        self.images, self.labels = images, labels
        self.num_rows = labels.shape[0]
        self.with_index = with_index
        self.batch_size = batch_size
        self.shuffle, self.seed, self.drop_remainder = shuffle, seed, drop_remainder
        self.augment, self.pad, self.steps_per_epoch = augment, pad, steps_per_epoch
        self.local_batch_size = batch_size // process_count
        self.lo = process_index * self.local_batch_size  # this host's rows: lo:lo + local
        self.normalize = _Normalizer(mean, std, *images.shape[2:])
        self._init_cache()

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
        out = {IMAGE: self.normalize(images), LABEL: self.labels[idx]}
        if self.with_index:
            out[INDEX] = idx.astype(np.int32)
        if not self.drop_remainder:
            have = idx.shape[0]
            mask = np.zeros((local,), dtype=bool)
            mask[:have] = True
            if have < local:
                out[IMAGE] = np.concatenate(
                    [out[IMAGE], np.zeros((local - have, *images.shape[1:]), np.float32)]
                )
                out[LABEL] = np.concatenate(
                    [out[LABEL], np.zeros((local - have,), np.int32)]
                )
                if self.with_index:
                    out[INDEX] = np.concatenate([out[INDEX], np.zeros((local - have,), np.int32)])
            out[MASK] = mask
        return out

    def __call__(self, index: int, _step_in_epoch: int) -> dict[str, np.ndarray]:
        """Grain's ``map_with_index`` transform: element ``index`` is global batch ``index``."""
        return self.batch(*divmod(index, self.steps_per_epoch))


class Loader(GrainLoader):
    """Batches in-memory arrays through a Grain pipeline; reproducible, resumable, per-host.

    Iterating (``next(loader)``, ``for batch in loader``) yields
    ``{"image": float32 [b,H,W,C], "label": int32 [b]}`` dicts (plus ``"mask": bool [b]``
    when ``drop_remainder=False``) from :attr:`position` on, advancing it, until ``num_epochs``
    epochs are done (forever if ``num_epochs is None``).  ``b = batch_size // process_count``.
    The position, resume and Grain methods (``position``, ``seek``, ``get_state``/``set_state``,
    ``batch``, ``epoch_order``, ``dataset``, ``close``) are :class:`~jaxkd.data.grain_loader.GrainLoader`'s,
    which :class:`~jaxkd.data.TextLoader` shares.

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
        mean, std: per-channel normalization (see :data:`~jaxkd.data.NORMALIZATION`): 1 or
            ``C`` finite numbers each, every ``std`` entry ``> 0``.
        shuffle: reshuffle every epoch (training) or keep the order (eval).
        seed: seed of the shuffling and augmentation, an integer ``>= 0``.
        drop_remainder: drop the last partial batch (training).  When False,
            the last batch is padded to ``batch_size`` and every batch has a
            ``"mask"`` (True for real examples).
        num_epochs: epochs to run (an integer ``>= 1``), counted from epoch 0 (a
            loader started at epoch 3 with ``num_epochs=5`` runs epochs 3 and 4);
            None: forever.
        augment: ``"none"``, ``"shift"`` or ``"crop_flip"`` (see :func:`~jaxkd.data.augment`).
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

    @property
    def num_examples(self) -> int:
        return int(self.images.shape[0])
