"""Documents packed into rows of ``seq_len`` tokens for language-model training.

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

Segment ids
    ``pack_documents(..., segment_ids=True)`` also returns each token's document within its row
    (``"segment_ids"``: ``1, 2, …``; 0 on padding) and its position inside it (``"positions"``, restarting
    at 0 with every document).  A model reading them (:mod:`jaxkd.models.lm`) attends only within a
    document and embeds its positions as if it were alone, and the targets do not cross a boundary
    (:func:`jaxkd.batch.target_mask`: the ``EOS`` of a document predicts nothing): the packed rows then
    train exactly like the same documents padded one per row, with no padding compute (the
    ``position_ids`` of transformers' ``DataCollatorWithFlattening`` / TRL's ``padding_free``, and the
    segment ids of Krell et al., 2021, "Efficient Sequence Packing without Cross-contamination").  The part
    of a document continued on the next row is a document of that row (positions from 0 again).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from jaxkd.batch import MASK, POSITIONS, SEGMENT_IDS, TOKENS
from jaxkd.checks import check_int
from jaxkd.data.text.tokenizer import BOS_ID, EOS_ID, PAD_ID

__all__ = ["PackedText", "pack_documents"]


def pack_documents(
    docs: Iterable[Sequence[int] | np.ndarray],
    seq_len: int,
    *,
    bos: int = BOS_ID,
    eos: int = EOS_ID,
    pad: int = PAD_ID,
    segment_ids: bool = False,
) -> dict[str, np.ndarray]:
    """Packs tokenized documents into rows of ``seq_len`` (GPT-2 style; see the module docstring).

    Each document becomes ``[bos, *ids, eos]``; they are concatenated in the given order and cut into
    ``N = ceil(total / seq_len)`` rows.  The last row is filled with ``pad`` where ``mask`` is False.
    Deterministic: the output depends only on the arguments.  Causal attention inside a row crosses
    document boundaries; the loss's target mask is ``mask[:, 1:] & mask[:, :-1]``.

    Args:
        docs: documents, each a 1-D sequence of integer ids (possibly empty).
        seq_len: tokens per row, an integer ``>= 2`` (a row needs an input and a target).
        bos, eos, pad: the special ids (default :class:`~jaxkd.data.ByteTokenizer`'s).
        segment_ids: also return ``"segment_ids"`` and ``"positions"`` (int32 ``[N, seq_len]``: each
            token's document within its row, 1, 2, … and 0 on padding; its position in that document).

    Returns:
        ``{"tokens": int32 [N, seq_len], "mask": bool [N, seq_len]}`` (plus ``"segment_ids"`` and
        ``"positions"`` with ``segment_ids=True``).

    Raises:
        ValueError: ``docs`` is empty, a document is not a 1-D integer sequence, or ``seq_len < 2``.
    """
    check_int("seq_len", seq_len, low=2)
    for name, value in (("bos", bos), ("eos", eos), ("pad", pad)):
        check_int(name, value, low=0)
    pieces, doc_index = [], []
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
        doc_index.append(np.full((arr.shape[0] + 2,), i, np.int64))
    if not pieces:
        raise ValueError("docs is empty: nothing to pack")
    stream = np.concatenate(pieces)
    rows = -(-stream.shape[0] // seq_len)
    tokens = np.full((rows * seq_len,), pad, np.int32)
    tokens[: stream.shape[0]] = stream
    mask = np.zeros((rows * seq_len,), bool)
    mask[: stream.shape[0]] = True
    out = {TOKENS: tokens.reshape(rows, seq_len), MASK: mask.reshape(rows, seq_len)}
    if segment_ids:
        doc = np.full((rows * seq_len,), -1, np.int64)
        doc[: stream.shape[0]] = np.concatenate(doc_index)
        doc = doc.reshape(rows, seq_len)
        starts = np.ones(doc.shape, bool)
        starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
        real = out[MASK]
        out[SEGMENT_IDS] = np.where(real, np.cumsum(starts & real, axis=1), 0).astype(np.int32)
        column = np.broadcast_to(np.arange(seq_len), doc.shape)
        first = np.maximum.accumulate(np.where(starts, column, 0), axis=1)
        out[POSITIONS] = np.where(real, column - first, 0).astype(np.int32)
    return out



@dataclasses.dataclass(frozen=True)
class PackedText:
    """Packed rows of a text split, with what bits per byte needs to know about them.

    Attributes:
        tokens: int32 ``[N, seq_len]`` (:func:`pack_documents`).
        mask: bool ``[N, seq_len]``.
        num_byte_targets: :func:`~jaxkd.data.count_byte_targets` of all rows: the bytes of text the
            next-token targets stand for (the denominator of :func:`~jaxkd.data.bits_per_byte` over the
            whole split).
        num_documents: documents packed.
        num_text_bytes: bytes of text of those documents (the targets cover all but the first token
            of each row).
        paths: the documents' names, in packing order.
        segment_ids, positions: int32 ``[N, seq_len]`` or ``None`` (``pack_documents(..., segment_ids=True)``).

    ``packed["tokens"]`` / ``packed["mask"]`` (and ``"segment_ids"``/``"positions"`` when set) give the
    arrays, so it can be used where a ``dict[str, np.ndarray]`` is expected.
    """

    tokens: np.ndarray
    mask: np.ndarray
    num_byte_targets: int
    num_documents: int
    num_text_bytes: int
    paths: tuple[str, ...] = ()
    segment_ids: np.ndarray | None = None
    positions: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def keys(self):
        return tuple(self.as_dict())

    def items(self):
        return self.as_dict().items()

    def __getitem__(self, key: str) -> np.ndarray:
        return self.as_dict()[key]

    def as_dict(self) -> dict[str, np.ndarray]:
        out = {TOKENS: self.tokens, MASK: self.mask}
        if self.segment_ids is not None:
            out[SEGMENT_IDS] = self.segment_ids
        if self.positions is not None:
            out[POSITIONS] = self.positions
        return out
