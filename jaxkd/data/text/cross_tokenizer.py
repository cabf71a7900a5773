"""Parallel rows of the same text under two tokenizers, for cross-tokenizer distillation (ALM).

A teacher and a student with different tokenizers (a byte-level teacher and a BPE student, say) must see
the *same text* in each row, and the loss must know which of their tokens cover the same bytes. This module
cuts texts into windows and writes, per window, both tokenizations and the ALM chunks that relate them
(:func:`jaxkd.losses.alm_chunk_alignment`; Minixhofer, Vulić & Ponti, 2025, "Cross-Tokenizer Distillation
via Approximate Likelihood Matching").

Windows (:func:`parallel_rows`)
    Each text is tokenized *whole* by both tokenizers (``encode_with_offsets``), so a row holds exactly the
    tokens each tokenizer gives that text in context, never a re-tokenization of a cut piece. A window may
    end only at a byte position that ends a token in *both* tokenizations (a common boundary; with a
    byte-level teacher every student token end is one). Windows are consecutive and greedy: each ends at
    the last common boundary at which the teacher row ``[BOS] + tokens`` still fits ``teacher_len`` and the
    student row ``[BOS] + tokens`` fits ``student_len``; the next one starts there. No text is skipped or
    repeated: the windows of a text concatenate to it. Each row starts with ``BOS`` (whose span is empty),
    has no ``EOS`` (a window is not a document) and is padded with ``PAD`` after its tokens (mask False).
    Choosing ``student_len``: a window is at most ``teacher_len − 1`` bytes; a byte-level BPE token is at
    least one byte, so ``student_len = teacher_len`` always lets the byte budget decide, and a smaller
    ``student_len`` (about ``teacher_len`` over the BPE's bytes per token, plus slack) saves the student's
    padding; windows of dense text then end early at the student's budget. If no common boundary fits a
    window (two tokenizers whose boundaries never meet within the budget), it is an error, not a silent cut.

Targets and chunks (the next-token convention of :mod:`jaxkd.losses.lm.tokens`)
    Position ``t``'s logits score token ``t + 1``, so the log-probabilities a model gives its tokens are
    those of the *targets* ``tokens[:, 1:]`` (``[N, T − 1]``, target ``j`` predicted at position ``j``; the
    ``BOS`` is never a target). The chunk ids are therefore given per target:
    ``alm_teacher_chunks [N, teacher_len − 1]`` and ``alm_student_chunks [N, student_len − 1]`` index the
    same positions as ``log_softmax(logits[:, :-1])`` gathered at ``tokens[:, 1:]``; ``-1`` is "in no
    chunk" (padding). Chunk ``c`` of row ``i`` covers the same bytes on both sides; ``alm_chunk_mask
    [N, C]`` marks the chunks that exist, with ``C = min(teacher_len, student_len) − 1`` slots (a chunk
    holds at least one target of each side).

Bits per byte
    Both rows of a window have the window's bytes as targets (``BOS`` is not a target, specials count 0),
    so :func:`jaxkd.data.count_byte_targets` with each tokenizer's ``token_byte_lengths`` gives the
    same number for both, ``row_bytes``: bits per byte compare across the two tokenizers exactly.

Batches (:class:`ParallelBatches`)
    A deterministic, resumable iterator: batch ``s`` of epoch ``e`` holds rows
    ``default_rng([seed, 0, e]).permutation(N)[s·b:(s+1)·b]`` (the order of :class:`jaxkd.data.Loader`), and
    carries the global normalizers of the token and chunk means (:mod:`jaxkd.losses.lm.tokens`), so means stay
    exact under gradient accumulation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from jaxkd.batch import MASK, TOKENS
from jaxkd.checks import check_int
from jaxkd.data.text.bits_per_byte import count_byte_targets
from jaxkd.data.text.tokenizer import Tokenizer, _as_bytes

__all__ = [
    "ALM_CHUNK_NORMALIZER_KEY",
    "PARALLEL_KEYS",
    "ParallelBatches",
    "ParallelText",
    "check_byte_counts",
    "parallel_rows",
    "window_bounds",
]

#: The array entries of a :class:`ParallelText` row (and of every batch).
PARALLEL_KEYS = (TOKENS, MASK, "student_tokens", "student_mask", "alm_teacher_chunks", "alm_student_chunks",
                 "alm_chunk_mask")
#: The batch entry holding the per-example share of the global chunk count (the ALM mean's denominator).
ALM_CHUNK_NORMALIZER_KEY = "alm_chunk_normalizer"


def window_bounds(teacher_ends, student_ends, *, max_teacher_tokens: int, max_student_tokens: int,
                  text_length: int) -> list[tuple[int, int, int, int, int, int]]:
    """The greedy windows of one text from its two tokenizations' token end offsets (host, NumPy).

    Args:
      teacher_ends, student_ends: the byte end offsets of each tokenization's tokens (increasing; the last
        one is ``text_length``).
      max_teacher_tokens, max_student_tokens: tokens a window may hold on each side.
      text_length: the text's length in bytes.

    Returns:
      ``[(byte_start, byte_end, teacher_first, teacher_stop, student_first, student_stop), ...]``: window
      ``k`` is bytes ``[byte_start, byte_end)``, teacher tokens ``teacher_first:teacher_stop`` and student
      tokens ``student_first:student_stop``; consecutive, covering the text.

    Raises:
      ValueError: a window in which no common boundary fits both budgets.
    """
    check_int("max_teacher_tokens", max_teacher_tokens, low=1)
    check_int("max_student_tokens", max_student_tokens, low=1)
    t_ends = np.asarray(teacher_ends, np.int64)
    s_ends = np.asarray(student_ends, np.int64)
    if text_length == 0:
        return []
    if t_ends.size == 0 or s_ends.size == 0 or t_ends[-1] != text_length or s_ends[-1] != text_length:
        raise ValueError(f"both tokenizations must cover the text's {text_length} bytes")
    common = np.intersect1d(t_ends, s_ends)  # sorted; holds text_length
    out = []
    start, ti, si = 0, 0, 0
    while start < text_length:
        # The furthest byte each side's budget reaches: the end of its last token that fits.
        limit = min(t_ends[min(ti + max_teacher_tokens, t_ends.size) - 1],
                    s_ends[min(si + max_student_tokens, s_ends.size) - 1])
        k = int(np.searchsorted(common, limit, side="right")) - 1
        end = int(common[k]) if k >= 0 else start
        if end <= start:
            raise ValueError(
                f"no window starting at byte {start} fits {max_teacher_tokens} teacher and {max_student_tokens} "
                f"student tokens and ends at a boundary of both tokenizations: use longer rows")
        t_stop = int(np.searchsorted(t_ends, end, side="right"))
        s_stop = int(np.searchsorted(s_ends, end, side="right"))
        out.append((start, end, ti, t_stop, si, s_stop))
        start, ti, si = end, t_stop, s_stop
    return out


@dataclasses.dataclass(frozen=True)
class ParallelText:
    """Parallel rows: the same windows of text under a teacher and a student tokenizer.

    Attributes:
      tokens, mask: the teacher's rows, int32 / bool ``[N, teacher_len]`` (``BOS`` + tokens, ``PAD``).
      student_tokens, student_mask: the student's rows, ``[N, student_len]``.
      alm_teacher_chunks: int32 ``[N, teacher_len − 1]``, the ALM chunk of each teacher *target* (token
        ``j + 1`` at index ``j``); ``-1``: none.
      alm_student_chunks: int32 ``[N, student_len − 1]``, the same for the student's targets.
      alm_chunk_mask: bool ``[N, C]``, ``C = min(teacher_len, student_len) − 1``: the chunks that exist.
      row_bytes: int64 ``[N]``: bytes of text in each row (its byte targets, the same on both sides).
      row_documents: int64 ``[N]``: which text each row comes from.
      num_documents: texts read (empty ones give no row).
      paths: the texts' names, when given.

    ``data["tokens"]`` etc. give the arrays (a ``dict[str, np.ndarray]`` view: :meth:`as_dict`).
    """

    tokens: np.ndarray
    mask: np.ndarray
    student_tokens: np.ndarray
    student_mask: np.ndarray
    alm_teacher_chunks: np.ndarray
    alm_student_chunks: np.ndarray
    alm_chunk_mask: np.ndarray
    row_bytes: np.ndarray
    row_documents: np.ndarray
    num_documents: int
    paths: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_byte_targets(self) -> int:
        """Bytes of text the targets of all rows stand for (the bits-per-byte denominator)."""
        return int(self.row_bytes.sum())

    def keys(self):
        return PARALLEL_KEYS

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in PARALLEL_KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def as_dict(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in PARALLEL_KEYS}

    def rows(self, index) -> dict[str, np.ndarray]:
        """The arrays of rows ``index`` (an integer array or slice)."""
        return {k: getattr(self, k)[index] for k in PARALLEL_KEYS}


def _row(ids, starts, ends, offset: int, length: int, bos: int, pad: int):
    """``[BOS] + ids`` padded to ``length``, its mask and its ``(start, end)`` offsets in the window."""
    n = len(ids)
    tokens = np.full((length,), pad, np.int32)
    tokens[0] = bos
    tokens[1:n + 1] = ids
    mask = np.arange(length) <= n
    spans = np.zeros((length, 2), np.int64)  # BOS and padding: empty spans at 0
    spans[1:n + 1, 0] = np.asarray(starts) - offset
    spans[1:n + 1, 1] = np.asarray(ends) - offset
    return tokens, mask, spans


def parallel_rows(
    texts: Sequence[str | bytes] | Sequence[tuple[str, str | bytes]],
    teacher_tokenizer: Tokenizer,
    student_tokenizer: Tokenizer,
    *,
    teacher_len: int,
    student_len: int,
    max_rows: int | None = None,
) -> ParallelText:
    """Cuts ``texts`` into windows and writes both tokenizations and their ALM chunks (deterministic).

    See the module docstring for the windows, the next-token convention of the chunk ids and the byte counts.

    Args:
      texts: texts (``str`` are UTF-8 encoded), or ``(path, text)`` pairs as
        :func:`jaxkd.data.text.stdlib_corpus.stdlib_corpus_texts` returns them.
      teacher_tokenizer, student_tokenizer: :class:`jaxkd.data.Tokenizer` s (``encode_with_offsets``,
        ``bos_id``, ``pad_id``, ``token_byte_lengths``).
      teacher_len, student_len: tokens per teacher / student row (``BOS`` included), ``>= 2``.
      max_rows: stop after this many rows (the first ones, in text order); ``None``: all.

    Returns:
      A :class:`ParallelText` (zero rows when every text is empty).

    Raises:
      ValueError: a bad argument, or a text whose tokenizations have no common boundary within a row.
    """
    check_int("teacher_len", teacher_len, low=2)
    check_int("student_len", student_len, low=2)
    if max_rows is not None:
        check_int("max_rows", max_rows, low=1)
    for name, tok in (("teacher_tokenizer", teacher_tokenizer), ("student_tokenizer", student_tokenizer)):
        if not isinstance(tok, Tokenizer):
            raise ValueError(f"{name} must have encode_with_offsets, special ids and token_byte_lengths, got {tok!r}")
    if isinstance(texts, (str, bytes)):
        raise ValueError("texts must be a sequence of texts, got a single str/bytes")
    num_chunks = min(teacher_len, student_len) - 1
    t_rows, s_rows, row_bytes, row_docs, paths = [], [], [], [], []
    num_documents = 0
    for d, item in enumerate(texts):
        if max_rows is not None and len(t_rows) >= max_rows:
            break
        if isinstance(item, tuple):
            path, item = item
            paths.append(str(path))
        data = _as_bytes(item)
        num_documents += 1
        t_ids, t_starts, t_ends = teacher_tokenizer.encode_with_offsets(data)
        s_ids, s_starts, s_ends = student_tokenizer.encode_with_offsets(data)
        for start, end, t0, t1, s0, s1 in window_bounds(
                t_ends, s_ends, max_teacher_tokens=teacher_len - 1, max_student_tokens=student_len - 1,
                text_length=len(data)):
            t_rows.append(_row(t_ids[t0:t1], t_starts[t0:t1], t_ends[t0:t1], start, teacher_len,
                               teacher_tokenizer.bos_id, teacher_tokenizer.pad_id))
            s_rows.append(_row(s_ids[s0:s1], s_starts[s0:s1], s_ends[s0:s1], start, student_len,
                               student_tokenizer.bos_id, student_tokenizer.pad_id))
            row_bytes.append(end - start)
            row_docs.append(d)
            if max_rows is not None and len(t_rows) == max_rows:
                break
    if paths and len(paths) != num_documents:
        raise ValueError("texts must be all texts or all (path, text) pairs")
    n = len(t_rows)
    if n == 0:
        empty = lambda length, dtype: np.zeros((0, length), dtype)  # noqa: E731
        return ParallelText(empty(teacher_len, np.int32), empty(teacher_len, bool), empty(student_len, np.int32),
                            empty(student_len, bool), empty(teacher_len - 1, np.int32),
                            empty(student_len - 1, np.int32), empty(num_chunks, bool), np.zeros((0,), np.int64),
                            np.zeros((0,), np.int64), num_documents, tuple(paths))
    tokens, mask, t_off = (np.stack(parts) for parts in zip(*t_rows))
    s_tokens, s_mask, s_off = (np.stack(parts) for parts in zip(*s_rows))
    # Chunks of the targets (tokens 1..): a target exists where its input and itself are real.
    t_ids, s_ids, chunk_mask = _alignment(
        t_off[:, 1:], s_off[:, 1:], mask[:, 1:] & mask[:, :-1], s_mask[:, 1:] & s_mask[:, :-1], num_chunks)
    return ParallelText(tokens, mask, s_tokens, s_mask, t_ids, s_ids, chunk_mask, np.asarray(row_bytes, np.int64),
                        np.asarray(row_docs, np.int64), num_documents, tuple(paths))


def _alignment(t_off, s_off, t_mask, s_mask, num_chunks):
    """:func:`jaxkd.losses.alm_chunk_alignment` of every row."""
    from jaxkd.losses.lm.alm import alm_chunk_alignment

    return alm_chunk_alignment(t_off, s_off, teacher_mask=t_mask, student_mask=s_mask, num_chunks=num_chunks)


def check_byte_counts(data: ParallelText, teacher_tokenizer: Tokenizer, student_tokenizer: Tokenizer) -> int:
    """The bits-per-byte denominator of ``data``, checked to be the same under both tokenizers.

    :func:`jaxkd.data.count_byte_targets` of the teacher rows and of the student rows (each with its
    tokenizer's ``token_byte_lengths``); both must equal ``data.num_byte_targets``.
    """
    t = count_byte_targets(data.tokens, data.mask, teacher_tokenizer.token_byte_lengths)
    s = count_byte_targets(data.student_tokens, data.student_mask, student_tokenizer.token_byte_lengths)
    if not t == s == data.num_byte_targets:
        raise ValueError(f"the teacher rows' targets stand for {t} bytes, the student rows' for {s}, the windows "
                         f"hold {data.num_byte_targets}: the rows are not parallel")
    return t


class ParallelBatches:
    """Batches of parallel rows with their global normalizers: deterministic, shuffled per epoch, resumable.

    Batch ``s`` of epoch ``e`` (a pure function of ``(seed, e, s)``, :meth:`batch`) holds the rows
    ``default_rng([seed, 0, e]).permutation(N)[s·b:(s+1)·b]`` (unshuffled: in order); the last partial
    batch of an epoch is dropped. Every batch is the arrays of :data:`PARALLEL_KEYS` plus

    * ``"token_normalizer"`` (:data:`jaxkd.batch.TOKEN_NORMALIZER`): the teacher-token
      ("tokens") target count over the batch size, per example (what ``lm_ce`` on ``"tokens"`` reads);
    * ``"student_token_normalizer"``: the same for the student's rows (``lm_ce(tokens_key="student_tokens")``);
    * :data:`ALM_CHUNK_NORMALIZER_KEY`: the batch's chunk count over the batch size, per example (what
      :func:`jaxkd.methods.alm` reads).

    ``extra`` adds row-aligned arrays under their names (e.g. a frozen teacher's cached target
    log-probabilities, ``"alm_teacher_log_probs"``, for ``alm(cached=True)``).

    Iterating yields batches from the current position (``position = (epoch, step)``); ``num_epochs=None``
    repeats forever. ``seek`` moves it; ``get_state``/``set_state`` save and restore it (resume).
    """

    def __init__(self, data: ParallelText, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None, start: tuple[int, int] = (0, 0),
                 extra: Mapping[str, np.ndarray] | None = None):
        self.data = data
        self.extra = {k: np.asarray(v) for k, v in (extra or {}).items()}
        for k, v in self.extra.items():
            if k in PARALLEL_KEYS or v.ndim < 1 or v.shape[0] != len(data):
                raise ValueError(f"extra[{k!r}] must be a new key with one entry per row ({len(data)}), got shape "
                                 f"{v.shape}")
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.seed = check_int("seed", seed, low=0)
        self.shuffle = bool(shuffle)
        self.num_epochs = None if num_epochs is None else check_int("num_epochs", num_epochs, low=1)
        self.steps_per_epoch = len(data) // self.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(data)} rows give no full batch of {batch_size}")
        self.seek(start)

    def seek(self, position: tuple[int, int]) -> None:
        epoch, step = (int(v) for v in position)
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"position must be (epoch >= 0, step in [0, {self.steps_per_epoch})), got {position}")
        self.position = (epoch, step)

    def get_state(self) -> dict[str, int]:
        """The position and what identifies the stream (a JSON dict, saved with a checkpoint)."""
        epoch, step = self.position
        return {"epoch": epoch, "step": step, "seed": self.seed, "batch_size": self.batch_size,
                "shuffle": int(self.shuffle), "num_rows": len(self.data)}

    def set_state(self, state: Mapping[str, int]) -> None:
        """Moves to the position of :meth:`get_state`'s ``state``; a state of another stream (seed, batch
        size, order or rows) is refused, naming what differs, instead of resuming with other batches."""
        mine = self.get_state()
        for key in ("seed", "batch_size", "shuffle", "num_rows"):
            if key in state and int(state[key]) != mine[key]:
                raise ValueError(f"the saved batch state has {key}={state[key]}, these batches {key}={mine[key]}")
        self.seek((state["epoch"], state["step"]))

    def epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.data)
        return np.random.default_rng([self.seed, 0, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        from jaxkd.batch import TOKEN_NORMALIZER as TOKEN_NORMALIZER_KEY, normalizer_key_of, token_normalizer

        rows = self.epoch_order(epoch)[step * self.batch_size:(step + 1) * self.batch_size]
        out = self.data.rows(rows)
        out.update({k: v[rows] for k, v in self.extra.items()})
        out[TOKEN_NORMALIZER_KEY] = token_normalizer(out[MASK][:, 1:] & out[MASK][:, :-1])
        out[normalizer_key_of("student_tokens")] = token_normalizer(
            out["student_mask"][:, 1:] & out["student_mask"][:, :-1])
        # The chunk count has the token count's form: the per-example share of the global count.
        out[ALM_CHUNK_NORMALIZER_KEY] = token_normalizer(out["alm_chunk_mask"])
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        epoch, step = self.position
        if self.num_epochs is not None and epoch >= self.num_epochs:
            raise StopIteration
        out = self.batch(epoch, step)
        step += 1
        if step == self.steps_per_epoch:
            epoch, step = epoch + 1, 0
        self.position = (epoch, step)
        return out
