"""The :class:`TextLoader`: batches of packed token rows through Grain, reproducible and resumable.

Rows (:func:`jaxkd.data.pack_documents`'s or a :class:`jaxkd.data.PackedText`'s) are shuffled, batched,
split between processes and resumed as :class:`jaxkd.data.Loader` does with images (both are a
:class:`jaxkd.data.grain_loader.GrainLoader`); each batch carries the token normalizer of its global
batch, and optionally the rows' indices and an offline teacher cache's top-k signals of the same rows.
"""

from __future__ import annotations

import numpy as np

from jaxkd.batch import INDEX, LOSS_MASK, MASK, POSITIONS, SEGMENT_IDS, TOKENS, target_mask
from jaxkd.checks import check_int
from jaxkd.data.grain_loader import GrainLoader, Position
from jaxkd.data.text.tokenizer import PAD_ID

__all__ = ["TextLoader"]


class _TextBatchMaker:
    """The pure function ``(epoch, step) -> this process's part of the batch`` of packed rows.

    The row order of an epoch is the one :class:`jaxkd.data.Loader` uses for examples
    (``default_rng([seed, 0, epoch]).permutation(N)``). Picklable (Grain worker processes).
    """

    def __init__(
        self, tokens, mask, *, batch_size, shuffle, seed, drop_remainder, steps_per_epoch,
        process_index, process_count, with_index, teacher_cache, pad, extras=None,
    ):
        self.tokens, self.mask = tokens, mask
        self.extras = dict(extras or {})  # segment_ids / positions / loss_mask, [N, T] each
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
        extras = {}
        for key, values in self.extras.items():  # padding rows: segment 0, position 0, no loss token
            extras[key] = np.zeros((b, values.shape[1]), values.dtype)
            extras[key][: rows.shape[0]] = values[rows]
        share = token_normalizer(target_mask(global_mask, extras.get(SEGMENT_IDS), extras.get(LOSS_MASK)))
        share = share[lo : lo + local]
        idx = rows[lo : lo + local]
        have = idx.shape[0]
        tokens = np.full((local, self.tokens.shape[1]), self.pad, np.int32)
        tokens[:have] = self.tokens[idx]
        out = {TOKENS: tokens, MASK: global_mask[lo : lo + local], TOKEN_NORMALIZER_KEY: share}
        out.update({key: values[lo : lo + local] for key, values in extras.items()})
        if self.with_index:
            index = np.zeros((local,), np.int32)
            index[:have] = idx
            out[INDEX] = index
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


class TextLoader(GrainLoader):
    """Batches of packed rows with :class:`jaxkd.data.Loader`'s Grain pipeline, positions and resume.

    Everything about order, positions and state is :class:`~jaxkd.data.Loader`'s (both are a
    :class:`~jaxkd.data.grain_loader.GrainLoader`):
    rows are shuffled per epoch with ``default_rng([seed, 0, epoch])``; batch ``s`` of epoch ``e`` is a
    pure function of ``(seed, e, s)``; ``position``, ``seek``, ``get_state``/``set_state`` resume it
    bitwise; process ``p`` of ``P`` gets rows ``p·b:(p+1)·b`` of every global batch.

    Each batch is ``{"tokens": int32 [b, T], "mask": bool [b, T], "token_normalizer": float32 [b]}``
    (``b = batch_size / process_count``; the normalizer is the global batch's target-token count over
    ``batch_size``, :func:`jaxkd.batch.token_normalizer`).  With ``drop_remainder=False`` the
    last batch is padded with rows whose mask is all False (tokens ``pad``).  ``with_index=True`` adds
    ``"index": int32 [b]`` (the rows' indices; 0 on padding rows); ``teacher_cache`` adds its
    ``"topk_indices"``/``"topk_log_probs"`` ``[b, T_cache, k]`` of the same rows (padding rows: zero mass).
    ``segment_ids``/``positions`` (packed documents, :func:`jaxkd.data.pack_documents` ``(segment_ids=True)``)
    and ``loss_mask`` (completion-only loss, :mod:`jaxkd.data.text.chat`) are passed through under the same
    names (padding rows: 0 / 0 / False), and the normalizer counts only the targets they leave
    (:func:`jaxkd.batch.target_mask`). A mapping ``tokens`` (a :class:`~jaxkd.data.PackedText`, a
    :func:`~jaxkd.data.pack_documents` or :func:`~jaxkd.data.chat_rows` dict) gives all of them at once.

    Args:
        tokens: integer ``[N, T]``, e.g. :func:`jaxkd.data.pack_documents`'s or a :class:`jaxkd.data.PackedText`'s.
        mask: bool ``[N, T]``.
        batch_size: global rows per batch, divisible by ``process_count``.
        shuffle, seed, drop_remainder, num_epochs, start: as for :class:`jaxkd.data.Loader`.
        process_index, process_count, num_threads, worker_count: as for :class:`jaxkd.data.Loader`.
        with_index: also yield the rows' indices.
        teacher_cache: a :class:`jaxkd.data.text.teacher_cache.TopKCache` with one sequence per row.
        pad: the id filling padding rows (default :data:`jaxkd.data.PAD_ID`; the mask says what is padding).
        segment_ids, positions: integer ``[N, T]``, each token's packed document and its position in it.
        loss_mask: bool ``[N, T]``, which tokens count as targets (False: prompt tokens).

    Raises:
        ValueError: a bad argument (the message names it), or a teacher cache whose length differs
            from the number of rows.
    """

    def __init__(
        self,
        tokens,
        mask=None,
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
        segment_ids=None,
        positions=None,
        loss_mask=None,
    ):
        if not isinstance(tokens, np.ndarray) and hasattr(tokens, "keys"):  # a packed/chat mapping
            rows = tokens
            tokens = rows[TOKENS]
            mask = rows[MASK] if mask is None else mask
            keys = set(rows.keys())
            segment_ids = rows[SEGMENT_IDS] if segment_ids is None and SEGMENT_IDS in keys else segment_ids
            positions = rows[POSITIONS] if positions is None and POSITIONS in keys else positions
            loss_mask = rows[LOSS_MASK] if loss_mask is None and LOSS_MASK in keys else loss_mask
        if mask is None:
            raise ValueError("TextLoader needs a mask (or a mapping with 'tokens' and 'mask')")
        # The geometry, processes, workers and position are GrainLoader's _set_iteration/_start; the methods
        # inherited use only those fields and self._maker.
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
        extras = {}
        for key, values, kind in ((SEGMENT_IDS, segment_ids, "int"), (POSITIONS, positions, "int"),
                                  (LOSS_MASK, loss_mask, "bool")):
            if values is None:
                continue
            values = np.asarray(values)
            ok = values.dtype == bool if kind == "bool" else np.issubdtype(values.dtype, np.integer)
            if values.shape != tokens.shape or not ok:
                raise ValueError(f"{key} must be {kind} with the tokens' shape {tokens.shape}, got "
                                 f"{values.dtype} {values.shape}")
            extras[key] = values if kind == "bool" else values.astype(np.int32)
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
            teacher_cache=teacher_cache, pad=int(pad), extras=extras,
        )
        self._start(start)

    @property
    def num_examples(self) -> int:
        """Rows (sequences) per epoch, before batching."""
        return int(self.tokens.shape[0])
