"""Data: TFDS loading without TensorFlow and a host-side NumPy batch pipeline.

See :mod:`jaxkd.data.pipeline` for the details and :mod:`jaxkd.data.digits`
for the ``digits`` builder (scikit-learn's bundled 8x8 images, no download).
"""

from jaxkd.data.pipeline import AUGMENTATIONS
from jaxkd.data.pipeline import CIFAR100_MEAN
from jaxkd.data.pipeline import CIFAR100_STD
from jaxkd.data.pipeline import CIFAR10_MEAN
from jaxkd.data.pipeline import CIFAR10_STD
from jaxkd.data.pipeline import DIGITS_MEAN
from jaxkd.data.pipeline import DIGITS_STD
from jaxkd.data.pipeline import Loader
from jaxkd.data.pipeline import NORMALIZATION
from jaxkd.data.pipeline import Position
from jaxkd.data.pipeline import Split
from jaxkd.data.pipeline import augment
from jaxkd.data.pipeline import channel_stats
from jaxkd.data.pipeline import load_split
from jaxkd.data.pipeline import normalize
from jaxkd.data.pipeline import subset_per_class
from jaxkd.data.pipeline import validate_labels

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
