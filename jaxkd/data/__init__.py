"""Data: TFDS loading without TensorFlow and host-side batch pipelines (Grain + NumPy), images and text apart.

* :mod:`jaxkd.data.images` — image classification data: :mod:`~jaxkd.data.images.sources` (:func:`load_split`
  of a TFDS split into memory, never downloading; :func:`subset_per_class`),
  :mod:`~jaxkd.data.images.normalization`, :mod:`~jaxkd.data.images.augmentation`,
  :mod:`~jaxkd.data.images.loader` (the :class:`Loader` of images and labels),
  :mod:`~jaxkd.data.images.imagenet` (:class:`ImageNetLoader`, ImageNet streamed from TFDS with the standard
  augmentation),
  :mod:`~jaxkd.data.images.teacher_cache` (a frozen teacher's outputs cached once: fixed-view logits or FKD
  region soft labels, and the :class:`CachedTeacherLoader` replaying them) and
  :mod:`~jaxkd.data.images.digits`, the ``digits`` builder (scikit-learn's bundled 8x8 images, no download).
* :mod:`jaxkd.data.text` — text for LMs: :mod:`~jaxkd.data.text.tokenizer` (the byte tokenizer and the
  tokenizer contract), :mod:`~jaxkd.data.text.bpe` (a small learned byte-level BPE),
  :mod:`~jaxkd.data.text.hf_tokenizer` (a checkpoint's ``tokenizer.json`` and chat template),
  :mod:`~jaxkd.data.text.chat` (chat / prompt-completion JSONL with completion-only loss masks),
  :mod:`~jaxkd.data.text.packing`, :mod:`~jaxkd.data.text.bits_per_byte`, :mod:`~jaxkd.data.text.loader`
  (the :class:`TextLoader` of packed rows), :mod:`~jaxkd.data.text.teacher_cache` (offline top-k teacher
  signals in array_record), :mod:`~jaxkd.data.text.cross_tokenizer` (parallel rows under two tokenizers)
  and :mod:`~jaxkd.data.text.stdlib_corpus` (the Python standard library's source as a TFDS data set).
  The last two are imported on demand (the corpus loads tensorflow_datasets).
* :mod:`jaxkd.data.grain_loader` — what both loaders share: the Grain iteration, positions, resume state
  and each process's rows.

The public names of those modules (but the two on demand and the loaders' base class) are exported here.
"""

from jaxkd.data.grain_loader import Position
from jaxkd.data.images.augmentation import AUGMENTATIONS, augment
from jaxkd.data.images.imagenet import ImageNetLoader, imagenet_source
from jaxkd.data.images.loader import Loader
from jaxkd.data.images.normalization import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DIGITS_MEAN,
    DIGITS_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMALIZATION,
    channel_stats,
    normalize,
)
from jaxkd.data.images.teacher_cache import (
    CachedTeacherLoader,
    TeacherCache,
    cached_teacher,
    load_or_write_teacher_cache,
    write_teacher_cache,
)
from jaxkd.data.images.sources import Split, load_split, subset_per_class, validate_labels
from jaxkd.data.text.bits_per_byte import bits_per_byte, count_byte_targets
from jaxkd.data.text.bpe import PRETOKENIZE_PATTERN, BPETokenizer, pretokenize, train_bpe
from jaxkd.data.text.chat import chat_example, chat_rows, read_jsonl
from jaxkd.data.text.hf_tokenizer import HFTokenizer
from jaxkd.data.text.loader import TextLoader
from jaxkd.data.text.packing import PackedText, pack_documents
from jaxkd.data.text.teacher_cache import TopKCache, cache_teacher_topk, topk_tail_mass, write_topk_cache
from jaxkd.data.text.tokenizer import BOS_ID, EOS_ID, NUM_BYTES, PAD_ID, ByteTokenizer, Tokenizer, token_byte_offsets

__all__ = [
    "AUGMENTATIONS",
    "BOS_ID",
    "BPETokenizer",
    "CachedTeacherLoader",
    "ByteTokenizer",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "EOS_ID",
    "HFTokenizer",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageNetLoader",
    "Loader",
    "NORMALIZATION",
    "NUM_BYTES",
    "PAD_ID",
    "PRETOKENIZE_PATTERN",
    "PackedText",
    "Position",
    "Split",
    "TeacherCache",
    "TextLoader",
    "Tokenizer",
    "TopKCache",
    "augment",
    "bits_per_byte",
    "cache_teacher_topk",
    "cached_teacher",
    "channel_stats",
    "chat_example",
    "chat_rows",
    "count_byte_targets",
    "imagenet_source",
    "load_or_write_teacher_cache",
    "load_split",
    "normalize",
    "pack_documents",
    "pretokenize",
    "read_jsonl",
    "subset_per_class",
    "token_byte_offsets",
    "topk_tail_mass",
    "train_bpe",
    "validate_labels",
    "write_teacher_cache",
    "write_topk_cache",
]
