"""TFDS builder for the handwritten digits images bundled with scikit-learn.

The data is the test part of the UCI "Optical Recognition of Handwritten
Digits" data set (Alpaydin & Kaynak, 1998) as shipped inside scikit-learn
(:func:`sklearn.datasets.load_digits`): 1797 grey-scale images of 8x8 pixels,
10 classes.  Nothing is downloaded: ``_split_generators`` ignores the download
manager and reads the arrays from the installed scikit-learn package.

Encoding
    sklearn's pixel values are integers in ``0..16``.  They are stored as uint8
    images of shape ``(8, 8, 1)`` rescaled to ``0..255`` with
    ``round(v * 255 / 16)`` (so 0 -> 0, 8 -> 128, 16 -> 255).

Splits (fixed, deterministic)
    The 1797 indices of ``load_digits()`` are permuted with
    ``np.random.default_rng(0).permutation(1797)``; the first 1297 indices of that
    permutation form ``train`` and the last 500 form ``test``.  The two splits are
    disjoint and together cover the whole data set.  Each example's key is its
    index in ``load_digits()``; TFDS stores the examples of a split in an order
    given by hashing the keys (deterministic), not in permutation order.

Works without TensorFlow: images are handed to the ``Image`` feature as PNG
bytes encoded with Pillow, and the data set is meant to be prepared with
``file_format="array_record"`` and read with ``builder.as_data_source(split)``
(see :func:`jaxkd.data.load_split`, which does both).
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds

from jaxkd.data.local_builder import LocalBuilder

NUM_EXAMPLES = 1797
NUM_TRAIN = 1297
NUM_TEST = NUM_EXAMPLES - NUM_TRAIN  # 500
SPLIT_SEED = 0

_DESCRIPTION = """\
Handwritten digits 0-9 as 8x8 grey-scale images: the 1797 images of the UCI
"Optical Recognition of Handwritten Digits" data set bundled with scikit-learn
(`sklearn.datasets.load_digits`, no download needed). Pixel values 0..16 are
rescaled to uint8 0..255 with round(v * 255 / 16). Splits: a permutation of the
1797 images with numpy.random.default_rng(0); its first 1297 images are `train`,
its last 500 are `test`.
"""

_CITATION = """\
@misc{alpaydin1998optical,
    author       = {Alpaydin, E. and Kaynak, C.},
    title        = {Optical Recognition of Handwritten Digits},
    year         = {1998},
    howpublished = {UCI Machine Learning Repository},
    doi          = {10.24432/C50P49},
}
"""


def split_indices() -> dict[str, np.ndarray]:
    """The indices into ``sklearn.datasets.load_digits()`` of each split."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(NUM_EXAMPLES)
    return {"train": perm[:NUM_TRAIN], "test": perm[NUM_TRAIN:]}


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 images as uint8 ``[N, 8, 8, 1]`` (0..255) and int64 labels ``[N]``."""
    from sklearn.datasets import load_digits  # local: sklearn is slow to import

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    if images.shape != (NUM_EXAMPLES, 8, 8, 1):
        raise ValueError(f"unexpected digits images shape {images.shape}")
    return images, labels


class Digits(LocalBuilder):
    """scikit-learn's bundled 8x8 handwritten digits (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # The data ships with scikit-learn: no network.
        images, labels = load_arrays()
        return {
            name: self._generate_examples(images, labels, idx)
            for name, idx in split_indices().items()
        }

    def _generate_examples(self, images, labels, indices):
        for i in indices:
            i = int(i)
            # Hand the Image feature PNG bytes: it encodes NumPy arrays with
            # TensorFlow, but passes encoded bytes through unchanged.
            yield i, {"image": _png_bytes(images[i]), "label": int(labels[i])}


def _png_bytes(image: np.ndarray) -> bytes:
    """Encodes one uint8 ``[H, W, 1]`` image as PNG with Pillow (no TensorFlow)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buffer, format="PNG")
    return buffer.getvalue()
