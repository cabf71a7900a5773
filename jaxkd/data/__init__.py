"""Data: TFDS loading without TensorFlow and a host-side batch pipeline (Grain + NumPy).

See :mod:`jaxkd.data.pipeline` for the details and :mod:`jaxkd.data.digits`
for the ``digits`` builder (scikit-learn's bundled 8x8 images, no download).
"""

from jaxkd.data import pipeline
from jaxkd.data.pipeline import *  # noqa: F401,F403 - the public API is pipeline.__all__

__all__ = list(pipeline.__all__)
