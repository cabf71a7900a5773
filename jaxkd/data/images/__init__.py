"""Image classification data: TFDS splits in memory, normalization, augmentation and the :class:`~jaxkd.data.Loader`.

* :mod:`~jaxkd.data.images.sources` — :func:`~jaxkd.data.load_split` (TFDS without TensorFlow, never
  downloading) and the :class:`~jaxkd.data.Split` it returns;
* :mod:`~jaxkd.data.images.normalization` — per-channel normalization and its constants;
* :mod:`~jaxkd.data.images.augmentation` — random shifts, crops and flips of a batch;
* :mod:`~jaxkd.data.images.loader` — the :class:`~jaxkd.data.Loader`;
* :mod:`~jaxkd.data.images.teacher_cache` — a frozen teacher's outputs cached once (fixed-view logits, FKD
  region soft labels) and the :class:`~jaxkd.data.CachedTeacherLoader` that replays them;
* :mod:`~jaxkd.data.images.digits` — the ``digits`` TFDS builder (scikit-learn's bundled 8x8 images, no
  download; imported on demand, it loads tensorflow_datasets).

Their public names are exported from :mod:`jaxkd.data`.
"""
