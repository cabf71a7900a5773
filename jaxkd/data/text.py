"""Text for language-model distillation: a byte tokenizer, document packing and bits per byte.

Tokens
    :class:`ByteTokenizer` maps text to its UTF-8 bytes: ids ``0..255`` are the bytes themselves and
    three specials follow, ``PAD = 256``, ``BOS = 257``, ``EOS = 258`` (``vocab_size = 259``).  The
    byte-level BPE of :mod:`jaxkd.data.bpe` keeps the same 259 first ids and numbers its merged tokens
    from 259 on, so both tokenizers agree on bytes and specials.  Every tokenizer here also gives
    ``token_byte_lengths`` (int32 ``[vocab_size]``: how many bytes of text each token stands for, 0 for
    the specials) and ``encode_with_offsets(text) -> (ids, byte_starts, byte_ends)``; the spans of a
    token sequence are the running sums of its byte lengths (:func:`token_byte_offsets`), which is what
    cross-tokenizer distillation aligns teacher and student chunks by.

Padding
    Whether a position is real is said by the ``mask`` only.  ``PAD`` merely fills the padded positions
    of ``tokens`` so that the array is rectangular; nothing may read a token's id to decide whether it is
    padding (a PAD-valued id inside the mask would still be a real token).

Packing
    :func:`pack_documents` writes every document as ``BOS, ids..., EOS``, concatenates them in the order
    given and cuts the stream into rows of ``seq_len`` (GPT-2's packing; Radford et al., 2019, "Language
    Models are Unsupervised Multitask Learners").  Only the last row is padded (``mask`` False, ``PAD``
    ids).  The attention is the plain causal one, so inside a row it crosses document boundaries: a
    token may attend to the end of the previous document.  The ``EOS``/``BOS`` pair between them tells
    the model where one ends.  A document longer than a row is continued on the next row, and the first
    token of a row has no context from the previous row.

    The next-token convention of :mod:`jaxkd.losses.lm.tokens`: logits at position ``t`` score token
    ``t + 1``; the targets are ``tokens[:, 1:]`` and the target mask is ``mask[:, 1:] & mask[:, :-1]``.
    So the first token of every row is never a target.

Bits per byte
    :func:`bits_per_byte` is ``total_nats / (num_bytes · ln 2)``.  The numerator is the summed
    next-token cross-entropy (in nats) over the target mask, specials included: every document has one
    ``EOS`` target (and, after the first, one ``BOS`` target) whichever the tokenizer, so the two
    tokenizers pay for the same events.  The denominator counts only the bytes of text that the
    targets stand for, :func:`count_byte_targets`: ``Σ token_byte_lengths[target]`` over the target
    mask (1 for a byte token, the token's length for a BPE token, 0 for ``PAD``/``BOS``/``EOS``).  The
    same text therefore gives the same denominator under any tokenizer, up to the first token of each
    row (never a target), and bits per byte compare across tokenizers where nats per token do not.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from jaxkd.checks import check_int
from jaxkd.data.pipeline import Loader, Position

__all__ = [
    "BOS_ID",
    "ByteTokenizer",
    "EOS_ID",
    "NUM_BYTES",
    "PAD_ID",
    "PackedText",
    "TextLoader",
    "Tokenizer",
    "bits_per_byte",
    "count_byte_targets",
    "pack_documents",
    "token_byte_offsets",
]

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
    """What :func:`pack_documents`, :func:`count_byte_targets` and the corpus loaders use of a tokenizer."""

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
    :class:`jaxkd.data.bpe.BPETokenizer`.

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
    given by a mask; ``PAD`` only fills padded positions (see the module docstring).
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


# --------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------


def pack_documents(
    docs: Iterable[Sequence[int] | np.ndarray],
    seq_len: int,
    *,
    bos: int = BOS_ID,
    eos: int = EOS_ID,
    pad: int = PAD_ID,
) -> dict[str, np.ndarray]:
    """Packs tokenized documents into rows of ``seq_len`` (GPT-2 style; see the module docstring).

    Each document becomes ``[bos, *ids, eos]``; they are concatenated in the given order and cut into
    ``N = ceil(total / seq_len)`` rows.  The last row is filled with ``pad`` where ``mask`` is False.
    Deterministic: the output depends only on the arguments.  Causal attention inside a row crosses
    document boundaries; the loss's target mask is ``mask[:, 1:] & mask[:, :-1]``.

    Args:
        docs: documents, each a 1-D sequence of integer ids (possibly empty).
        seq_len: tokens per row, an integer ``>= 2`` (a row needs an input and a target).
        bos, eos, pad: the special ids (default :class:`ByteTokenizer`'s).

    Returns:
        ``{"tokens": int32 [N, seq_len], "mask": bool [N, seq_len]}``.

    Raises:
        ValueError: ``docs`` is empty, a document is not a 1-D integer sequence, or ``seq_len < 2``.
    """
    check_int("seq_len", seq_len, low=2)
    for name, value in (("bos", bos), ("eos", eos), ("pad", pad)):
        check_int(name, value, low=0)
    pieces = []
    special_bos = np.array([bos], np.int32)
    special_eos = np.array([eos], np.int32)
    int32 = np.iinfo(np.int32)
    for i, doc in enumerate(docs):
        arr = np.asarray(doc)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(
                f"docs[{i}] must be a 1-D sequence of integer ids, got dtype {arr.dtype} shape {arr.shape}"
            )
        if arr.size and (arr.min() < 0 or arr.max() > int32.max):
            raise ValueError(f"docs[{i}] has ids outside [0, 2**31): [{arr.min()}, {arr.max()}]")
        pieces += [special_bos, arr.astype(np.int32), special_eos]
    if not pieces:
        raise ValueError("docs is empty: nothing to pack")
    stream = np.concatenate(pieces)
    rows = -(-stream.shape[0] // seq_len)
    tokens = np.full((rows * seq_len,), pad, np.int32)
    tokens[: stream.shape[0]] = stream
    mask = np.zeros((rows * seq_len,), bool)
    mask[: stream.shape[0]] = True
    return {"tokens": tokens.reshape(rows, seq_len), "mask": mask.reshape(rows, seq_len)}


def count_byte_targets(tokens, mask, token_byte_lengths) -> int:
    """The number of text bytes the next-token targets of ``tokens`` stand for.

    ``Σ token_byte_lengths[tokens[:, 1:]]`` over the target mask ``mask[:, 1:] & mask[:, :-1]``: a byte
    token counts 1, a BPE token its length in bytes, a special 0.  This is the denominator of
    :func:`bits_per_byte` (see the module docstring).

    Args:
        tokens: integer ``[N, T]``.
        mask: bool ``[N, T]`` (True = real token).
        token_byte_lengths: integer ``[V]`` (a tokenizer's ``token_byte_lengths``).
    """
    tokens = np.asarray(tokens)
    mask = np.asarray(mask, bool)
    lengths = np.asarray(token_byte_lengths, np.int64)
    if tokens.ndim != 2 or mask.shape != tokens.shape:
        raise ValueError(
            f"tokens and mask must both be [N, T], got shapes {tokens.shape} and {mask.shape}"
        )
    if lengths.ndim != 1:
        raise ValueError(f"token_byte_lengths must be 1-D [V], got shape {lengths.shape}")
    if tokens.shape[1] < 2:
        return 0
    target_mask = mask[:, 1:] & mask[:, :-1]
    targets = tokens[:, 1:][target_mask]
    if targets.size and (targets.min() < 0 or targets.max() >= lengths.shape[0]):
        raise ValueError(
            f"target ids must lie in [0, {lengths.shape[0]}), got [{targets.min()}, {targets.max()}]"
        )
    return int(lengths[targets].sum())


def bits_per_byte(total_nats, num_bytes) -> float:
    """``total_nats / (num_bytes · ln 2)``: the summed next-token loss in bits per byte of text.

    ``total_nats`` is the cross-entropy summed (not averaged) over the target mask, specials included;
    ``num_bytes`` is :func:`count_byte_targets` of the same tokens (byte targets only), which makes the
    result comparable across tokenizers (see the module docstring).

    Raises:
        ValueError: ``num_bytes`` is not a positive number, or ``total_nats`` is negative or not finite.
    """
    total = float(np.asarray(total_nats))
    count = float(np.asarray(num_bytes))
    if not math.isfinite(total) or total < 0:
        raise ValueError(f"total_nats must be a finite number >= 0, got total_nats={total_nats!r}")
    if not math.isfinite(count) or count <= 0:
        raise ValueError(f"num_bytes must be a positive number, got num_bytes={num_bytes!r}")
    return total / (count * math.log(2.0))


@dataclasses.dataclass(frozen=True)
class PackedText:
    """Packed rows of a text split, with what bits per byte needs to know about them.

    Attributes:
        tokens: int32 ``[N, seq_len]`` (:func:`pack_documents`).
        mask: bool ``[N, seq_len]``.
        num_byte_targets: :func:`count_byte_targets` of all rows: the bytes of text the next-token
            targets stand for (the denominator of :func:`bits_per_byte` over the whole split).
        num_documents: documents packed.
        num_text_bytes: bytes of text of those documents (the targets cover all but the first token
            of each row).
        paths: the documents' names, in packing order.

    ``packed["tokens"]`` / ``packed["mask"]`` give the arrays, so it can be used where a
    ``dict[str, np.ndarray]`` is expected.
    """

    tokens: np.ndarray
    mask: np.ndarray
    num_byte_targets: int
    num_documents: int
    num_text_bytes: int
    paths: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def keys(self):
        return ("tokens", "mask")

    def items(self):
        return self.as_dict().items()

    def __getitem__(self, key: str) -> np.ndarray:
        return self.as_dict()[key]

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens, "mask": self.mask}


# --------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------


class _TextBatchMaker:
    """The pure function ``(epoch, step) -> this process's part of the batch`` of packed rows.

    The row order of an epoch is the one :class:`jaxkd.data.Loader` uses for examples
    (``default_rng([seed, 0, epoch]).permutation(N)``). Picklable (Grain worker processes).
    """

    def __init__(
        self, tokens, mask, *, batch_size, shuffle, seed, drop_remainder, steps_per_epoch,
        process_index, process_count, with_index, teacher_cache, pad,
    ):
        self.tokens, self.mask = tokens, mask
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.drop_remainder, self.steps_per_epoch = drop_remainder, steps_per_epoch
        self.local_batch_size = batch_size // process_count
        self.lo = process_index * self.local_batch_size
        self.with_index, self.teacher_cache, self.pad = with_index, teacher_cache, pad

    def epoch_order(self, epoch: int) -> np.ndarray:
        n = self.tokens.shape[0]
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, 0, epoch]).permutation(n)

    def batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        from jaxkd.batch import TOKEN_NORMALIZER as TOKEN_NORMALIZER_KEY, token_normalizer

        b, local, lo = self.batch_size, self.local_batch_size, self.lo
        rows = self.epoch_order(epoch)[step * b : (step + 1) * b]  # the global batch
        # The normalizer needs the global batch's token count: count it over all its rows (padding
        # rows of a last partial batch have none), then keep this process's share.
        global_mask = np.zeros((b, self.mask.shape[1]), bool)
        global_mask[: rows.shape[0]] = self.mask[rows]
        share = token_normalizer(global_mask[:, 1:] & global_mask[:, :-1])[lo : lo + local]
        idx = rows[lo : lo + local]
        have = idx.shape[0]
        tokens = np.full((local, self.tokens.shape[1]), self.pad, np.int32)
        tokens[:have] = self.tokens[idx]
        out = {"tokens": tokens, "mask": global_mask[lo : lo + local], TOKEN_NORMALIZER_KEY: share}
        if self.with_index:
            index = np.zeros((local,), np.int32)
            index[:have] = idx
            out["index"] = index
        if self.teacher_cache is not None:
            cache = self.teacher_cache
            teacher = cache.batch(idx)
            if have < local:
                # Padding rows: k distinct indices with zero mass (-inf), which the sparse losses
                # treat as excluded entries (no NaN), under an all-False mask anyway.
                shape = (local - have, cache.seq_len, cache.k)
                fill_i = np.broadcast_to(np.arange(cache.k, dtype=np.int32), shape)
                fill_v = np.full(shape, -np.inf, np.float32)
                teacher = {
                    "topk_indices": np.concatenate([teacher["topk_indices"], fill_i]),
                    "topk_log_probs": np.concatenate([teacher["topk_log_probs"], fill_v]),
                }
            out.update(teacher)
        return out

    def __call__(self, k: int, _) -> dict[str, np.ndarray]:
        epoch, step = divmod(k, self.steps_per_epoch)
        return self.batch(epoch, step)


class TextLoader(Loader):
    """Batches of packed rows with :class:`jaxkd.data.Loader`'s Grain pipeline, positions and resume.

    Everything about order, positions and state is :class:`~jaxkd.data.Loader`'s (it is a subclass):
    rows are shuffled per epoch with ``default_rng([seed, 0, epoch])``; batch ``s`` of epoch ``e`` is a
    pure function of ``(seed, e, s)``; ``position``, ``seek``, ``get_state``/``set_state`` resume it
    bitwise; process ``p`` of ``P`` gets rows ``p·b:(p+1)·b`` of every global batch.

    Each batch is ``{"tokens": int32 [b, T], "mask": bool [b, T], "token_normalizer": float32 [b]}``
    (``b = batch_size / process_count``; the normalizer is the global batch's target-token count over
    ``batch_size``, :func:`jaxkd.batch.token_normalizer`).  With ``drop_remainder=False`` the
    last batch is padded with rows whose mask is all False (tokens ``pad``).  ``with_index=True`` adds
    ``"index": int32 [b]`` (the rows' indices; 0 on padding rows); ``teacher_cache`` adds its
    ``"topk_indices"``/``"topk_log_probs"`` ``[b, T_cache, k]`` of the same rows (padding rows: zero mass).

    Args:
        tokens: integer ``[N, T]``, e.g. :func:`pack_documents`'s or a :class:`PackedText`'s.
        mask: bool ``[N, T]``.
        batch_size: global rows per batch, divisible by ``process_count``.
        shuffle, seed, drop_remainder, num_epochs, start: as for :class:`jaxkd.data.Loader`.
        process_index, process_count, num_threads, worker_count: as for :class:`jaxkd.data.Loader`.
        with_index: also yield the rows' indices.
        teacher_cache: a :class:`jaxkd.data.teacher_cache.TopKCache` with one sequence per row.
        pad: the id filling padding rows (default :data:`PAD_ID`; the mask says what is padding).

    Raises:
        ValueError: a bad argument (the message names it), or a teacher cache whose length differs
            from the number of rows.
    """

    def __init__(
        self,
        tokens,
        mask,
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_remainder: bool = True,
        num_epochs: int | None = 1,
        start: Position | tuple[int, int] = Position(0, 0),
        process_index: int | None = None,
        process_count: int | None = None,
        num_threads: int = 0,
        worker_count: int = 0,
        with_index: bool = False,
        teacher_cache=None,
        pad: int = PAD_ID,
    ):
        # Loader.__init__ validates images and labels; the rest (geometry, processes, workers, position) is
        # Loader's own _set_iteration/_start, and the methods inherited use only those fields.
        tokens = np.asarray(tokens)
        mask = np.asarray(mask)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be integer [N, T], got {tokens.dtype} {tokens.shape}")
        if mask.shape != tokens.shape or mask.dtype != bool:
            raise ValueError(
                f"mask must be bool with the tokens' shape {tokens.shape}, got {mask.dtype} {mask.shape}"
            )
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.int32).max):
            raise ValueError(f"tokens must be ids in [0, 2**31), got [{tokens.min()}, {tokens.max()}]")
        check_int("pad", pad, low=0)
        if teacher_cache is not None and len(teacher_cache) != tokens.shape[0]:
            raise ValueError(
                f"teacher_cache has {len(teacher_cache)} sequences, the tokens {tokens.shape[0]} rows:"
                " the cache must hold one sequence per row, in row order"
            )
        self._set_iteration(
            tokens.shape[0], batch_size=batch_size, shuffle=shuffle, seed=seed, drop_remainder=drop_remainder,
            num_epochs=num_epochs, process_index=process_index, process_count=process_count,
            num_threads=num_threads, worker_count=worker_count,
        )
        self.tokens = tokens.astype(np.int32)
        self.mask = mask
        self._maker = _TextBatchMaker(
            self.tokens, self.mask, batch_size=self.batch_size, shuffle=shuffle, seed=self.seed,
            drop_remainder=drop_remainder, steps_per_epoch=self.steps_per_epoch,
            process_index=self.process_index, process_count=self.process_count, with_index=bool(with_index),
            teacher_cache=teacher_cache, pad=int(pad),
        )
        self._start(start)

    @property
    def num_examples(self) -> int:
        """Rows (sequences) per epoch, before batching."""
        return int(self.tokens.shape[0])
