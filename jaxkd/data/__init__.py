"""Data: TFDS loading without TensorFlow and host-side batch pipelines (Grain + NumPy).

* :mod:`jaxkd.data.pipeline` — :class:`Loader` over images and labels; :mod:`jaxkd.data.digits`, the
  ``digits`` builder (scikit-learn's bundled 8x8 images, no download).
* :mod:`jaxkd.data.text` — the byte tokenizer, packing, bits per byte and :class:`TextLoader` for LMs;
  :mod:`jaxkd.data.bpe`, a small learned byte-level BPE; :mod:`jaxkd.data.stdlib_corpus`, the Python
  standard library's source as a TFDS data set (imported on demand: it loads tensorflow_datasets);
  :mod:`jaxkd.data.teacher_cache`, offline top-k teacher signals in array_record.
"""

from jaxkd.data import bpe, pipeline, teacher_cache, text
from jaxkd.data.bpe import *  # noqa: F401,F403
from jaxkd.data.pipeline import *  # noqa: F401,F403 - the public API is pipeline.__all__
from jaxkd.data.teacher_cache import *  # noqa: F401,F403
from jaxkd.data.text import *  # noqa: F401,F403

__all__ = sorted({*pipeline.__all__, *text.__all__, *bpe.__all__, *teacher_cache.__all__})
