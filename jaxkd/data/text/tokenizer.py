"""Tokens for language-model distillation: the tokenizer contract and the byte tokenizer.

:class:`ByteTokenizer` maps text to its UTF-8 bytes: ids ``0..255`` are the bytes themselves and three
specials follow, ``PAD = 256``, ``BOS = 257``, ``EOS = 258`` (``vocab_size = 259``).  The byte-level BPE of
:mod:`jaxkd.data.text.bpe` keeps the same 259 first ids and numbers its merged tokens from 259 on, so both
tokenizers agree on bytes and specials.  Every tokenizer here (the :class:`Tokenizer` protocol) also gives
``token_byte_lengths`` (int32 ``[vocab_size]``: how many bytes of text each token stands for, 0 for the
specials) and ``encode_with_offsets(text) -> (ids, byte_starts, byte_ends)``; the spans of a token
sequence are the running sums of its byte lengths (:func:`token_byte_offsets`), which is what
cross-tokenizer distillation aligns teacher and student chunks by.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from jaxkd.checks import check_int

__all__ = ["BOS_ID", "ByteTokenizer", "EOS_ID", "NUM_BYTES", "PAD_ID", "Tokenizer", "token_byte_offsets"]

#: Byte tokens are ids ``0 .. NUM_BYTES - 1``.
NUM_BYTES = 256
#: Fills padded positions; the mask, not this id, says what is padding.
PAD_ID = 256
#: Starts every packed document.
BOS_ID = 257
#: Ends every packed document.
EOS_ID = 258


def _as_bytes(text: str | bytes | bytearray | memoryview) -> bytes:
    if isinstance(text, str):
        return text.encode("utf-8")
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text)
    raise ValueError(f"text must be str or bytes, got {type(text).__name__}")


def _as_ids(ids, vocab_size: int, name: str = "ids") -> np.ndarray:
    """``ids`` as a 1-D int64 array, each in ``[0, vocab_size)``."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise ValueError(
            f"{name} must lie in [0, {vocab_size}), got values in [{arr.min()}, {arr.max()}]"
        )
    return arr.astype(np.int64)


@runtime_checkable
class Tokenizer(Protocol):
    """What :func:`~jaxkd.data.pack_documents`, :func:`~jaxkd.data.count_byte_targets` and the corpus loaders use
    of a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    @property
    def token_byte_lengths(self) -> np.ndarray: ...

    def encode(self, text: str | bytes) -> np.ndarray: ...

    def encode_with_offsets(self, text: str | bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def decode(self, ids) -> bytes: ...


def token_byte_offsets(ids, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The byte span of every token of ``ids``: ``(starts, ends)``, int64 ``[n]`` each.

    Token ``i`` stands for bytes ``starts[i]:ends[i]`` of ``tokenizer.decode(ids)`` (the concatenation of
    the tokens' bytes): ``ends = cumsum(lengths)``, ``starts = ends - lengths`` with
    ``lengths = tokenizer.token_byte_lengths[ids]``.  Specials have empty spans (``start == end``).
    The same function serves :class:`ByteTokenizer` (every byte token spans one byte) and
    :class:`jaxkd.data.text.bpe.BPETokenizer`.

    Raises:
        ValueError: ``ids`` is not 1-D, or holds an id outside ``[0, vocab_size)``.
    """
    lengths = np.asarray(tokenizer.token_byte_lengths, np.int64)
    ids = _as_ids(ids, lengths.shape[0])
    size = lengths[ids]
    ends = np.cumsum(size)
    return ends - size, ends


class ByteTokenizer:
    """Text as its UTF-8 bytes: ids ``0..255`` are the bytes, then ``PAD=256, BOS=257, EOS=258``.

    ``encode`` never emits specials (packing adds ``BOS``/``EOS``); ``decode`` drops them.  Padding is
    given by a mask; ``PAD`` only fills padded positions (see :mod:`jaxkd.data.text.packing`).
    """

    vocab_size = NUM_BYTES + 3
    pad_id = PAD_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __repr__(self) -> str:
        return "ByteTokenizer()"

    def __eq__(self, other) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(ByteTokenizer)

    @property
    def token_byte_lengths(self) -> np.ndarray:
        """int32 ``[259]``: 1 for every byte token, 0 for the specials."""
        lengths = np.zeros((self.vocab_size,), np.int32)
        lengths[:NUM_BYTES] = 1
        return lengths

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token ``token_id`` stands for (``b""`` for a special)."""
        check_int("token_id", token_id, low=0)
        if token_id >= self.vocab_size:
            raise ValueError(f"token_id must lie in [0, {self.vocab_size}), got token_id={token_id}")
        return bytes([token_id]) if token_id < NUM_BYTES else b""

    def encode(self, text: str | bytes) -> np.ndarray:
        """int32 ``[len(utf8 bytes)]``: the bytes of ``text`` (a ``str`` is UTF-8 encoded)."""
        return np.frombuffer(_as_bytes(text), dtype=np.uint8).astype(np.int32)

    def encode_with_offsets(self, text: str | bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, byte_starts, byte_ends)``: token ``i`` is byte ``i`` (``starts = i``, ``ends = i + 1``)."""
        ids = self.encode(text)
        starts, ends = token_byte_offsets(ids, self)
        return ids, starts, ends

    def decode(self, ids) -> bytes:
        """The bytes of the byte tokens of ``ids``, specials dropped.

        Raises:
            ValueError: an id outside ``[0, 259)`` or ``ids`` not 1-D.
        """
        arr = _as_ids(ids, self.vocab_size)
        return arr[arr < NUM_BYTES].astype(np.uint8).tobytes()
