"""The ``digits`` TFDS builder (scikit-learn's bundled 8x8 handwritten digits)."""

from jaxkd.data.images.digits.digits import Digits

__all__ = ["Digits"]
