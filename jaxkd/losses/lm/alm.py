"""ALM: cross-tokenizer distillation by approximate likelihood matching.

Minixhofer, Vulić & Ponti, "Cross-Tokenizer Distillation via Approximate Likelihood Matching" (2025; v4:
"Universal Cross-Tokenizer Distillation via Approximate Likelihood Matching"), checked against the
official code, ``bminixhofer/tokenkit`` (``tokenkit/align.py``: ``get_alignment_indices`` /
``get_unconstrained_alignments``; ``tokenkit/training/losses.py``: ``compute_alm_loss``).

Teacher and student tokenize the same text differently (e.g. a byte-level teacher and a subword student).
The text is cut into *chunks*: spans whose two ends are token boundaries in both tokenizations. A chunk's
likelihood under a model is the product of the probabilities of its tokens, so its log-likelihood is the
sum of the token log-probabilities in it; ALM matches the teacher's and the student's chunk likelihoods
with a binarised f-divergence. Two parts:

* host-side data preparation: :func:`alm_chunk_alignment` (NumPy, from the tokens' byte offsets);
* the jittable loss :func:`alm`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_choice, check_int, check_positive
from jaxkd.losses.core import Array, Reduction, reduce_loss, to_float
from jaxkd.losses.logit.sparse import _log1mexp

__all__ = ["alm_chunk_alignment", "alm_chunk_log_likelihoods", "alm"]


# ----- host-side chunk alignment -----


def _offset_array(name: str, offsets) -> np.ndarray:
    """Integer ``(start, end)`` byte offsets as ``[B, T, 2]`` (a ``[T, 2]`` sequence gains the batch axis);
    the shape and dtype checked (the cross-tokenizer alignments of ALM and ULD)."""
    array = np.asarray(offsets)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[-1] != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{name} must be integer (start, end) byte offsets of shape [T, 2] or [B, T, 2], got shape "
            f"{np.shape(offsets)} and dtype {array.dtype}"
        )
    return array


def _as_offsets(name: str, offsets) -> np.ndarray:
    array = _offset_array(name, offsets)
    if np.any(array[..., 1] < array[..., 0]):
        raise ValueError(f"{name} has a token whose end offset is before its start")
    return array


def _token_mask_array(name: str, mask, shape: tuple[int, int]) -> np.ndarray:
    """A per-token bool mask of ``shape`` ``[B, T]`` (``None``: every token; a ``[T]`` mask gains the batch axis)."""
    if mask is None:
        return np.ones(shape, bool)
    mask = np.asarray(mask, bool)
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != shape:
        raise ValueError(f"{name} must have shape {shape} (one entry per token), got {mask.shape}")
    return mask


def _chunks_of_sequence(t_off, t_valid, s_off, s_valid):
    """Chunk ids of one sequence: ``(teacher_ids, student_ids, num_chunks)``; -1 = in no chunk."""
    t_tok = t_valid & (t_off[:, 1] > t_off[:, 0])  # empty spans (special tokens) belong to no chunk
    s_tok = s_valid & (s_off[:, 1] > s_off[:, 0])
    t_ids = np.full(len(t_off), -1, np.int64)
    s_ids = np.full(len(s_off), -1, np.int64)
    if not t_tok.any() or not s_tok.any():
        return t_ids, s_ids, 0
    ends = np.intersect1d(t_off[t_tok, 1], s_off[s_tok, 1])  # common boundaries, sorted
    if ends.size == 0:
        return t_ids, s_ids, 0
    # A token belongs to the chunk of the first common boundary at or after its end.
    t_raw = np.where(t_tok, np.searchsorted(ends, t_off[:, 1], side="left"), -1)
    s_raw = np.where(s_tok, np.searchsorted(ends, s_off[:, 1], side="left"), -1)
    t_raw[t_raw >= ends.size] = -1  # after the last common boundary: an unfinished chunk
    s_raw[s_raw >= ends.size] = -1
    # A chunk is kept when both sides' members tile the same bytes [start_c, ends[c]) (vectorized over chunks).
    t_ok, t_first, t_last = _chunk_spans(t_off, t_raw, ends.size)
    s_ok, s_first, s_last = _chunk_spans(s_off, s_raw, ends.size)
    starts = np.concatenate([t_first[:1], ends[:-1]])  # the first chunk starts where the text does
    keep = t_ok & s_ok & (t_first == starts) & (s_first == starts) & (t_last == ends) & (s_last == ends)
    renumber = np.full(ends.size + 1, -1, np.int64)  # index -1 (no chunk) maps to -1
    renumber[:-1][keep] = np.arange(int(keep.sum()))
    return renumber[t_raw], renumber[s_raw], int(keep.sum())


def _chunk_spans(off, raw, num_chunks):
    """Per chunk of one side: ``(contiguous, first start, last end)``; ``contiguous`` is False for a chunk
    without members or whose members, in start order, leave a gap or overlap."""
    member = raw >= 0
    chunk, start, end = raw[member], off[member, 0], off[member, 1]
    order = np.lexsort((start, chunk))  # by chunk, then start (stable: ties keep text order)
    chunk, start, end = chunk[order], start[order], end[order]
    same = chunk[1:] == chunk[:-1]
    broken = np.zeros(num_chunks, bool)
    broken[chunk[1:][same & (start[1:] != end[:-1])]] = True
    first_start = np.full(num_chunks, -1, np.int64)
    last_end = np.full(num_chunks, -1, np.int64)
    first_start[chunk[np.concatenate([[True], ~same])]] = start[np.concatenate([[True], ~same])]
    last_end[chunk[np.concatenate([~same, [True]])]] = end[np.concatenate([~same, [True]])]
    present = np.bincount(chunk, minlength=num_chunks) > 0
    return present & ~broken, first_start, last_end


def alm_chunk_alignment(
    teacher_byte_offsets,
    student_byte_offsets,
    *,
    teacher_mask=None,
    student_mask=None,
    num_chunks: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aligned chunks of two tokenizations of the same texts, from the tokens' byte offsets (host, NumPy).

    ALM's "unconstrained" chunks (``get_alignment_indices`` in ``bminixhofer/tokenkit``, which walks both
    token sequences and closes a chunk whenever the cumulative byte lengths agree): a chunk ends at every
    byte position that is the end of a token in both tokenizations, so the chunks are the shortest spans
    with common boundaries. Here from explicit ``(start, end)`` byte offsets:

    * the tokens considered are those with ``mask`` true and a non-empty span (``start < end``; special
      tokens with no text belong to no chunk, as tokenkit drops tokens that normalize to ``""``);
    * common boundaries ``e_0 < e_1 < …``: the end offsets shared by both sides; a token with end ``e``
      belongs to chunk ``c``, the first with ``e ≤ e_c``; tokens after the last common boundary belong to no
      chunk (an unfinished chunk, e.g. a truncation that differs);
    * a chunk is kept only if on each side it has at least one token and its tokens tile exactly the same
      bytes ``[e_{c−1}, e_c)`` (for the first chunk: the same start on both sides) — so a masked token, a gap
      or an overlap inside a chunk drops that chunk (tokenkit likewise drops chunks whose texts differ).
      Kept chunks are numbered ``0, 1, …`` in text order.

    With a byte-level teacher every byte is a boundary, so each student token (with its bytes) is a chunk.

    Args:
      teacher_byte_offsets, student_byte_offsets: integer ``[T, 2]`` or ``[B, T, 2]`` (start, end) offsets
        into the same texts (per sequence), tokens in text order.
      teacher_mask, student_mask: boolean ``[T]`` / ``[B, T]``: the tokens that exist (padding False), or
        ``None`` for all. A token whose log-probability is unavailable (e.g. the first token of a
        sequence, which nothing predicts) must be masked: its chunk is then dropped.
      num_chunks: the size ``C`` of the chunk axis (a static shape for ``jit``); ``None``: the largest
        count in the batch (at least 1). Fewer chunks than found is an error.

    Returns:
      ``(teacher_chunk_ids [B, Tt], student_chunk_ids [B, Ts], chunk_mask [B, C])``: int32 chunk ids
      (``-1``: in no chunk) and which chunk slots hold a chunk.
    """
    t_off = _as_offsets("teacher_byte_offsets", teacher_byte_offsets)
    s_off = _as_offsets("student_byte_offsets", student_byte_offsets)
    if t_off.shape[0] != s_off.shape[0]:
        raise ValueError(
            f"teacher and student offsets must cover the same batch, got {t_off.shape[0]} and {s_off.shape[0]} "
            "sequences"
        )
    t_mask = _token_mask_array("teacher_mask", teacher_mask, t_off.shape[:2])
    s_mask = _token_mask_array("student_mask", student_mask, s_off.shape[:2])
    results = [_chunks_of_sequence(t_off[b], t_mask[b], s_off[b], s_mask[b]) for b in range(t_off.shape[0])]
    found = max([n for _, _, n in results] + [1])
    if num_chunks is None:
        num_chunks = found
    num_chunks = check_int("num_chunks", num_chunks, low=1)
    if num_chunks < found:
        raise ValueError(f"num_chunks={num_chunks} is smaller than the {found} chunks of the longest sequence")
    t_ids = np.stack([r[0] for r in results]).astype(np.int32)
    s_ids = np.stack([r[1] for r in results]).astype(np.int32)
    chunk_mask = np.arange(num_chunks)[None, :] < np.array([r[2] for r in results])[:, None]
    return t_ids, s_ids, chunk_mask


# ----- the loss -----


def _check_ids(name: str, ids, log_probs, num_chunks: int) -> None:
    if np.shape(ids) != np.shape(log_probs):
        raise ValueError(
            f"{name} must have the shape of its token log-probabilities {np.shape(log_probs)}, got {np.shape(ids)}"
        )
    dtype = ids.dtype if hasattr(ids, "dtype") else np.asarray(ids).dtype
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {dtype}")
    if not isinstance(ids, jax.core.Tracer) and np.size(ids):
        values = np.asarray(ids)
        if values.min() < -1 or values.max() >= num_chunks:
            raise ValueError(
                f"{name} must lie in [-1, {num_chunks}) (-1: no chunk; chunk_mask has {num_chunks} slots), "
                f"got values in [{values.min()}, {values.max()}]"
            )


def alm_chunk_log_likelihoods(token_log_probs: Array, chunk_ids: Array, num_chunks: int) -> Array:
    """``log p(chunk c) = Σ_{t: chunk_ids[t] = c} log p(token t)`` per sequence: ``[B, T] -> [B, C]``.

    Tokens with id ``-1`` contribute nothing (and get a zero gradient, whatever their value).
    """
    x = to_float(token_log_probs)
    ids = jnp.asarray(chunk_ids)
    member = ids >= 0
    values = jnp.where(member, x, 0.0)
    segment = lambda v, i: jax.ops.segment_sum(v, i, num_segments=num_chunks)  # noqa: E731
    return jax.vmap(segment)(values, jnp.where(member, ids, 0))


_DIVERGENCES = ("binary_kl", "binary_ce", "reverse_binary_kl")


def alm(
    student_token_log_probs: Array,
    teacher_token_log_probs: Array,
    student_chunk_ids: Array,
    teacher_chunk_ids: Array,
    chunk_mask: Array,
    *,
    temperature: float = 100.0,
    divergence: str = "binary_kl",
    epsilon: float = 1e-6,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Approximate likelihood matching: a binarised f-divergence between chunk likelihoods.

    Minixhofer, Vulić & Ponti, "Cross-Tokenizer Distillation via Approximate Likelihood Matching" (2025),
    as ``compute_alm_loss`` in ``bminixhofer/tokenkit`` (``tokenkit/training/losses.py``) computes it. Per
    chunk ``c`` (see :func:`alm_chunk_alignment`), with ``ℓ(c) = min(Σ_{t∈c} log p(token t), 0)`` on each side
    (:func:`alm_chunk_log_likelihoods`; the clip at 0 is the official one) and the binarisation
    temperature ``τ``::

        a = ℓ_T(c)/τ − ε,   b = ℓ_S(c)/τ − ε          (p = e^a, q = e^b: the likelihoods to the power 1/τ)
        binary_kl:          p (a − b) + (1 − p)(log(1 − p) − log(1 − q))      = KL(Bern(p) ‖ Bern(q))
        binary_ce:          −[p·b + (1 − p)·log(1 − q)]                        (the official default)
        reverse_binary_kl:  q (b − a) + (1 − q)(log(1 − q) − log(1 − p))      = KL(Bern(q) ‖ Bern(p))

    and the loss is the mean over the chunks that ``chunk_mask`` marks (the official
    ``distill_main_path_numerator = denominator = "chunk_count"``). The paper's objective is the binarised
    f-divergence (binary KL for ``f = KL``); the official code's default ``binary_ce`` differs from
    ``binary_kl`` by the teacher's binary entropy, which does not depend on the student (same student
    gradient, tested). ``τ = 100`` and ``ε = 10⁻⁶`` are the official defaults (``binarization_temp``; ``ε``
    keeps ``log(1 − q)`` finite when a chunk's probability rounds to 1). Not implemented: tokenkit's
    debiasing options (``alm_mode`` "append_space" / "merge_by_space_prob", and the "unbiased" and "space"
    chunk kinds) — this is the ``alm_unconstrained`` loss with ``alm_mode=""``.

    Args:
      student_token_log_probs: ``[B, Ts]``: ``log p_S(token t | tokens < t)`` of the student's tokens.
      teacher_token_log_probs: ``[B, Tt]``, the same for the teacher's tokens.
      student_chunk_ids, teacher_chunk_ids: integer ``[B, Ts]`` / ``[B, Tt]`` chunk of each token (``-1``:
        none), as :func:`alm_chunk_alignment` returns.
      chunk_mask: boolean ``[B, C]``, the chunk slots that hold a chunk.
      temperature: ``τ > 0``.
      divergence: ``"binary_kl"``, ``"binary_ce"`` or ``"reverse_binary_kl"``.
      epsilon: ``ε > 0`` (with ``ε = 0`` a chunk of probability 1 would make ``log(1 − q)`` infinite).
      weights: optional float ``[B, C]`` per-chunk weights for the reduction.
      reduction: ``"mean"`` (over valid chunks; 0 when none), ``"sum"`` or ``"none"`` (per chunk ``[B, C]``).
    """
    check_positive("temperature", temperature)
    check_positive("epsilon", epsilon)
    check_choice("divergence", divergence, _DIVERGENCES)
    if np.ndim(chunk_mask) != 2:
        raise ValueError(f"chunk_mask must be [B, C], got shape {np.shape(chunk_mask)}")
    batch, num_chunks = np.shape(chunk_mask)
    named = (("student_token_log_probs", student_token_log_probs), ("teacher_token_log_probs", teacher_token_log_probs))
    for name, lp in named:
        if np.ndim(lp) != 2 or np.shape(lp)[0] != batch:
            raise ValueError(f"{name} must be [B, T] with B = {batch} (chunk_mask's batch), got shape {np.shape(lp)}")
    _check_ids("student_chunk_ids", student_chunk_ids, student_token_log_probs, num_chunks)
    _check_ids("teacher_chunk_ids", teacher_chunk_ids, teacher_token_log_probs, num_chunks)
    ll_s = jnp.minimum(alm_chunk_log_likelihoods(student_token_log_probs, student_chunk_ids, num_chunks), 0.0)
    ll_t = jnp.minimum(alm_chunk_log_likelihoods(teacher_token_log_probs, teacher_chunk_ids, num_chunks), 0.0)
    dtype = jnp.promote_types(ll_s.dtype, ll_t.dtype)
    a = ll_t.astype(dtype) / temperature - epsilon
    b = ll_s.astype(dtype) / temperature - epsilon
    p, q = jnp.exp(a), jnp.exp(b)
    one_minus_p, one_minus_q = -jnp.expm1(a), -jnp.expm1(b)
    if divergence == "binary_kl":
        value = p * (a - b) + one_minus_p * (_log1mexp(a) - _log1mexp(b))
    elif divergence == "binary_ce":
        value = -(p * b + one_minus_p * _log1mexp(b))
    else:
        value = q * (b - a) + one_minus_q * (_log1mexp(b) - _log1mexp(a))
    return reduce_loss(value, mask=jnp.asarray(chunk_mask, bool), weights=weights, reduction=reduction)
