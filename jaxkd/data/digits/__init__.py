"""The ``digits`` TFDS builder (scikit-learn's bundled 8x8 handwritten digits)."""

from jaxkd.data.digits.digits import Digits

__all__ = ["Digits"]
