"""Offline teacher signals: the teacher's top-k next-token distribution per sequence, on disk.

Distilling a language model from a large teacher is cheaper when the teacher runs once over the corpus
and its sparse output is stored (the "offline" top-k logits of DistillKit, arcee-ai/DistillKit, and of
sparse knowledge distillation in general): for every sequence ``i`` of a packed split and every
position ``t < T``, the ``k`` most probable next tokens ``topk_indices[t]`` and their log-probabilities
over the *full* vocabulary ``topk_log_probs[t]`` (e.g. :func:`jaxkd.losses.topk_teacher`, which
:func:`jaxkd.losses.sparse_forward_kl` consumes).  Position ``t`` holds what the teacher's logits at
``t`` say about token ``t + 1`` (the next-token convention; the shift to targets happens in the loss,
so ``T`` is normally the row length and the last position is simply never used).

Tail mass
    The probability the teacher puts outside its top k is ``1 − Σ_j exp(topk_log_probs[t, j])`` per
    position (:func:`topk_tail_mass`).  ``sparse_forward_kl(..., tail="bucket")`` uses exactly that as
    the teacher's mass of one extra "tail" category; nothing else about the tail is stored.

File format (one ``array_record`` file, written by ``ArrayRecordWriter`` with ``group_size:1``,
uncompressed, so that any record is read alone):

    Record 0 is a JSON header ``{"format": "jaxkd.topk_cache", "version": 1, "k", "seq_len",
    "vocab_size", "index_dtype", "log_prob_dtype"}``.  Record ``1 + i`` is sequence ``i``: the raw
    little-endian bytes of ``topk_indices`` (``[T, k]``, ``uint16`` when ``vocab_size <= 65536``,
    else ``int32``: exact either way) followed by those of ``topk_log_probs`` (``[T, k]``, ``float32``
    by default).  Size per sequence: ``T·k·(2 or 4) + T·k·(4 or 2)`` bytes; ``T = 256, k = 32``
    with uint16 and float32 is 48 KiB.

Precision
    ``log_prob_dtype="float32"`` (default) stores the values exactly.  ``"float16"`` halves them and
    rounds to nearest: ``|Δ log p| ≤ 2⁻¹¹·|log p|`` (for ``|log p| ≥ 6.1e-5``; below, an absolute
    ``≤ 3e-8``), so ``p`` is off by a factor ``exp(±4.9e-4·|log p|)``: 0.05 % at ``p = e⁻¹``, 0.5 % at
    ``p = e⁻¹⁰``; the tail mass inherits ``Σ_j p_j · 4.9e-4·|log p_j|``.  Log-probabilities below
    ``−65504`` become ``−inf`` (zero mass, as they practically are).  Reads return float32 either way.

Writing is all-or-nothing: the file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from jaxkd.batch import MASK, TOKENS
from jaxkd.checks import check_choice, check_int

__all__ = ["TopKCache", "cache_teacher_topk", "topk_tail_mass", "write_topk_cache"]

_FORMAT = "jaxkd.topk_cache"
_WRITER_OPTIONS = "group_size:1,uncompressed"
_READER_OPTIONS = "readahead_buffer_size:0"
_LOG_PROB_DTYPES = {"float32": "<f4", "float16": "<f2"}
# Σ exp(top-k log-probs) above 1 + this means the values are not log-probabilities (e.g. logits).
_MASS_TOLERANCE = 1e-3


def topk_tail_mass(topk_log_probs) -> np.ndarray:
    """``1 − Σ_j exp(topk_log_probs[..., j])``: the teacher's mass outside its top k, per position.

    Computed in float64 and clipped to ``[0, 1]`` (rounding can push a full top-k slightly below 0).
    """
    lp = np.asarray(topk_log_probs, np.float64)
    return np.clip(1.0 - np.exp(lp).sum(axis=-1), 0.0, 1.0)


def _index_dtype(vocab_size: int) -> str:
    return "<u2" if vocab_size <= 1 << 16 else "<i4"


def _check_record(i: int, indices, log_probs, *, seq_len: int, k: int, vocab_size: int):
    """The record's arrays as validated NumPy arrays, or ``ValueError`` naming sequence ``i``."""
    indices = np.asarray(indices)
    log_probs = np.asarray(log_probs)
    if indices.shape != (seq_len, k) or log_probs.shape != (seq_len, k):
        raise ValueError(
            f"sequence {i}: topk_indices and topk_log_probs must both be [T={seq_len}, k={k}] (the"
            f" shape of the cache), got {indices.shape} and {log_probs.shape}"
        )
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"sequence {i}: topk_indices must be integers, got dtype {indices.dtype}")
    if indices.size and (indices.min() < 0 or indices.max() >= vocab_size):
        raise ValueError(
            f"sequence {i}: topk_indices must lie in [0, vocab_size={vocab_size}), got values in"
            f" [{indices.min()}, {indices.max()}]"
        )
    if k > 1 and np.any(np.diff(np.sort(indices, axis=-1), axis=-1) == 0):
        raise ValueError(f"sequence {i}: topk_indices must be distinct within each position")
    if not np.issubdtype(log_probs.dtype, np.floating):
        raise ValueError(f"sequence {i}: topk_log_probs must be floats, got dtype {log_probs.dtype}")
    lp = log_probs.astype(np.float64)
    if np.any(np.isnan(lp)) or np.any(lp == np.inf):
        raise ValueError(f"sequence {i}: topk_log_probs must not be NaN or +inf")
    mass = np.exp(lp).sum(axis=-1)
    if np.any(mass > 1.0 + _MASS_TOLERANCE):
        raise ValueError(
            f"sequence {i}: topk_log_probs must be log-probabilities (Σ exp ≤ 1 per position), got"
            f" a position with Σ exp = {mass.max():.6g}; were logits passed instead?"
        )
    return indices, log_probs


def write_topk_cache(
    path: str | os.PathLike,
    records: Iterable[tuple[int, Any, Any]],
    *,
    vocab_size: int,
    k: int | None = None,
    seq_len: int | None = None,
    log_prob_dtype: str = "float32",
) -> int:
    """Writes the teacher's top-k per sequence to one array_record file (see the module docstring).

    Args:
        path: the file to write (replaced if it exists).
        records: ``(index, topk_indices [T, k] int, topk_log_probs [T, k] float)`` per sequence, with
            ``index`` running ``0, 1, 2, ...`` (one record per sequence, in index order).
        vocab_size: the teacher's vocabulary size (indices must lie in ``[0, vocab_size)``).
        k, seq_len: the shape ``[T, k]`` of every record (default: the first record's).
        log_prob_dtype: ``"float32"`` (exact) or ``"float16"`` (half the size; see Precision).

    Returns:
        The number of sequences written.

    Raises:
        ValueError: an index out of order, a record of another shape, indices outside the vocabulary
            or repeated within a position, values that are not log-probabilities (NaN, ``+inf``,
            ``Σ exp > 1``), or no record and no ``k``/``seq_len`` to write an empty cache with.
            Nothing is left at ``path`` then.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    check_int("vocab_size", vocab_size, low=1)
    check_choice("log_prob_dtype", log_prob_dtype, tuple(_LOG_PROB_DTYPES))
    iterator = iter(records)
    first = next(iterator, None)
    if first is not None:
        _, first_indices, _ = first
        shape = np.shape(first_indices)
        if len(shape) != 2:
            raise ValueError(f"sequence 0: topk_indices must be [T, k], got shape {shape}")
        seq_len = shape[0] if seq_len is None else seq_len
        k = shape[1] if k is None else k
    if k is None or seq_len is None:
        raise ValueError("records is empty: give k and seq_len to write an empty cache")
    check_int("k", k, low=1)
    check_int("seq_len", seq_len, low=1)
    if k > vocab_size:
        raise ValueError(f"k must be <= vocab_size={vocab_size}, got k={k}")
    index_dtype = _index_dtype(vocab_size)
    value_dtype = _LOG_PROB_DTYPES[log_prob_dtype]
    header = {
        "format": _FORMAT,
        "version": 1,
        "k": int(k),
        "seq_len": int(seq_len),
        "vocab_size": int(vocab_size),
        "index_dtype": index_dtype,
        "log_prob_dtype": value_dtype,
    }
    path = os.fspath(path)
    tmp = f"{path}.incomplete-{os.getpid()}"
    writer = ArrayRecordWriter(tmp, _WRITER_OPTIONS)
    count = 0
    try:
        writer.write(json.dumps(header).encode("utf-8"))
        for record in _chain(first, iterator):
            try:
                index, indices, log_probs = record
            except (TypeError, ValueError):
                raise ValueError(
                    f"each record must be (index, topk_indices, topk_log_probs), got record {count}"
                    f" of type {type(record).__name__}"
                ) from None
            if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index != count:
                raise ValueError(
                    f"records must come in index order 0, 1, 2, ...: expected index {count}, got"
                    f" {index!r}"
                )
            indices, log_probs = _check_record(
                count, indices, log_probs, seq_len=seq_len, k=k, vocab_size=vocab_size
            )
            body = indices.astype(index_dtype).tobytes() + log_probs.astype(value_dtype).tobytes()
            writer.write(body)
            count += 1
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        if writer.is_open():
            writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return count


def _chain(first, rest):
    if first is not None:
        yield first
    yield from rest


class TopKCache:
    """Random access to a cache written by :func:`write_topk_cache`; a Grain data source.

    ``cache[i]`` is ``{"topk_indices": int32 [T, k], "topk_log_probs": float32 [T, k]}`` of sequence
    ``i``; ``cache.batch(indices)`` stacks several (``[B, T, k]``).  It has ``__len__`` and
    ``__getitem__`` (Grain's ``RandomAccessDataSource``: ``grain.MapDataset.source(cache)``), reads
    under a lock (safe from Grain's reader threads) and pickles as its path (worker processes reopen
    the file).

    Args:
        path: the cache file.
        k, seq_len, vocab_size: what the caller expects; a cache of another shape or vocabulary raises
            (None: accept the file's).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a top-k cache, or its ``k``/``seq_len``/``vocab_size`` differ
            from those expected (the message gives both).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        k: int | None = None,
        seq_len: int | None = None,
        vocab_size: int | None = None,
    ):
        self.path = os.fspath(path)
        self._expected = {"k": k, "seq_len": seq_len, "vocab_size": vocab_size}
        self._open()

    def _open(self) -> None:
        from array_record.python.array_record_module import ArrayRecordReader

        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"no top-k teacher cache at {self.path!r}")
        try:
            reader = ArrayRecordReader(self.path, _READER_OPTIONS)
            total = reader.num_records()
            raw = reader.read([0]) if total else []
        except RuntimeError as e:
            raise ValueError(f"{self.path!r} is not a readable array_record file: {e}") from None
        try:
            header = json.loads(raw[0].decode("utf-8")) if raw else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
        if not isinstance(header, dict) or header.get("format") != _FORMAT:
            raise ValueError(f"{self.path!r} is not a jaxkd top-k teacher cache (no header)")
        if header.get("version") != 1:
            raise ValueError(f"{self.path!r}: unsupported cache version {header.get('version')!r}")
        for key, want in self._expected.items():
            if want is not None and header[key] != want:
                raise ValueError(
                    f"the teacher cache {self.path!r} has {key}={header[key]}, expected {key}={want}"
                    f" (k={header['k']}, seq_len={header['seq_len']},"
                    f" vocab_size={header['vocab_size']})"
                )
        self.header = header
        self.k = int(header["k"])
        self.seq_len = int(header["seq_len"])
        self.vocab_size = int(header["vocab_size"])
        self._index_dtype = np.dtype(header["index_dtype"])
        self._value_dtype = np.dtype(header["log_prob_dtype"])
        self._split = self.seq_len * self.k * self._index_dtype.itemsize
        self._size = self._split + self.seq_len * self.k * self._value_dtype.itemsize
        self._len = total - 1
        self._reader = reader
        self._lock = threading.Lock()

    @property
    def log_prob_dtype(self) -> str:
        """``"float32"`` or ``"float16"``: how the log-probabilities are stored."""
        return {v: n for n, v in _LOG_PROB_DTYPES.items()}[self._value_dtype.str]

    def __len__(self) -> int:
        return self._len

    def _position(self, i) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"sequence index must be an integer, got {type(i).__name__}")
        j = int(i) + self._len if i < 0 else int(i)
        if not 0 <= j < self._len:
            raise IndexError(f"sequence {i} out of range for a cache of {self._len} sequences")
        return j + 1  # record 0 is the header

    def _decode(self, raw: bytes, i: int) -> tuple[np.ndarray, np.ndarray]:
        if len(raw) != self._size:
            raise ValueError(
                f"{self.path!r}: record of sequence {i} has {len(raw)} bytes, expected {self._size}"
                " (corrupt file?)"
            )
        shape = (self.seq_len, self.k)
        indices = np.frombuffer(raw, self._index_dtype, count=shape[0] * shape[1])
        values = np.frombuffer(raw, self._value_dtype, offset=self._split)
        return indices.reshape(shape).astype(np.int32), values.reshape(shape).astype(np.float32)

    def _read(self, positions: list[int]) -> list[bytes]:
        with self._lock:
            return self._reader.read(positions)

    def __getitem__(self, i) -> dict[str, np.ndarray]:
        raw = self._read([self._position(i)])[0]
        indices, values = self._decode(raw, int(i))
        return {"topk_indices": indices, "topk_log_probs": values}

    def batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """``{"topk_indices": int32 [B, T, k], "topk_log_probs": float32 [B, T, k]}`` of ``indices``."""
        indices = np.asarray(indices)
        if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
            raise ValueError(
                f"indices must be a 1-D sequence of integers, got {indices.dtype} {indices.shape}"
            )
        raws = self._read([self._position(i) for i in indices.tolist()]) if indices.size else []
        out_i = np.empty((len(raws), self.seq_len, self.k), np.int32)
        out_v = np.empty((len(raws), self.seq_len, self.k), np.float32)
        for b, (raw, i) in enumerate(zip(raws, indices.tolist())):
            out_i[b], out_v[b] = self._decode(raw, i)
        return {"topk_indices": out_i, "topk_log_probs": out_v}

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> TopKCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        return {"path": self.path, "expected": self._expected}

    def __setstate__(self, state):
        self.path = state["path"]
        self._expected = state["expected"]
        self._open()

    def __repr__(self) -> str:
        return (
            f"TopKCache({self.path!r}, sequences={self._len}, seq_len={self.seq_len}, k={self.k},"
            f" vocab_size={self.vocab_size}, log_prob_dtype={self.log_prob_dtype!r})"
        )


def cache_teacher_topk(
    path: str | os.PathLike,
    model: Any,
    variables: Any,
    tokens,
    mask,
    *,
    k: int,
    batch_size: int = 64,
    temperature: float = 1.0,
    log_prob_dtype: str = "float32",
) -> "TopKCache":
    """Runs the teacher once over packed rows and writes its top-k next-token distribution per row.

    ``model`` is a :class:`jaxkd.models.Model` taking ``{"tokens", "mask"}`` (an LM of
    :mod:`jaxkd.models.lm`, possibly vocabulary-truncated); ``tokens``/``mask`` ``[N, T]`` are the rows
    in the order the loader indexes them. The log-probabilities are
    :func:`jaxkd.losses.topk_teacher`'s (full-vocabulary softmax at ``temperature``), exactly the values
    a live :func:`jaxkd.methods.sparse_token_kd` computes in its step. Returns the opened cache.
    """
    import jax

    from jaxkd.inference import map_batches
    from jaxkd.losses import topk_teacher
    from jaxkd.participants import Participant

    check_int("k", k, low=1)
    check_int("batch_size", batch_size, low=1)
    tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
    if tokens.ndim != 2 or mask.shape != tokens.shape:
        raise ValueError(f"tokens and mask must both be [N, T], got {tokens.shape} and {mask.shape}")

    def topk(outputs, batch):
        return topk_teacher(outputs.logits, k, temperature=temperature)

    vocab_size = int(jax.eval_shape(lambda: model.apply(variables, {TOKENS: tokens[:1], MASK: mask[:1]},
                                                        train=False).logits).shape[-1])
    teacher = Participant(model, variables, trains=False, input=(TOKENS, MASK))

    def records():
        n = tokens.shape[0]
        batches = ({TOKENS: tokens[i:i + batch_size], MASK: mask[i:i + batch_size]} for i in range(0, n, batch_size))
        start = 0
        for indices, log_probs in map_batches(teacher, batches, topk, name="teacher"):
            for j in range(indices.shape[0]):
                yield start + j, indices[j], log_probs[j]
            start += indices.shape[0]

    write_topk_cache(path, records(), vocab_size=vocab_size, k=k, seq_len=tokens.shape[1],
                     log_prob_dtype=log_prob_dtype)
    return TopKCache(path, k=k, seq_len=tokens.shape[1], vocab_size=vocab_size)
