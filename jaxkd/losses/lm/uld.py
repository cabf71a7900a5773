"""ULD: cross-tokenizer distillation by comparing *sorted* probability vectors, and GOLD's hybrid extension.

Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs" (2024):
two models with different vocabularies cannot be compared entry by entry, but the *sorted* probability
vectors can — the Wasserstein-1 distance between the two next-token distributions, with a uniform cost between
any two tokens, is bounded by the L1 distance between their sorted probability vectors (the shorter one padded
with zeros). The alignment of the two token sequences follows TRL's GOLD (``trl/experimental/gold/
gold_trainer.py``, ``ULDLoss`` with ``use_extended_uld=True``): the two tokenizations of the same completion are
cut into *groups* of tokens ending at a common byte boundary (``_align_by_byte_offsets``); a group of several
tokens is merged into one (unnormalized) distribution by the chain rule (``_merge_probabilities_with_alignment_
groups``); and the ``hybrid`` loss (``_compute_hybrid_uld_loss``) compares the entries of the vocabulary the two
tokenizers share directly (generalized JSD) and the rest by sorting.

Two parts, like ALM's (:mod:`jaxkd.losses.lm.alm`):

* host-side data preparation: :func:`uld_alignment` (NumPy, from the tokens' byte offsets), or the original
  paper's position-by-position pairs :func:`uld_positional_alignment`, and :func:`uld_matched_vocabulary`
  (from the two tokenizers' vocabularies);
* the jittable loss :func:`uld`.

The group ids have the format of ALM's chunk ids (one id per token, ``-1`` for none, a ``[B, G]`` mask of the
groups that exist), so the rows of :func:`jaxkd.data.text.cross_tokenizer.parallel_rows` — whose windows tile
the text and end at a common boundary — serve both methods: on them the two alignments coincide (tested).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_choice, check_in_range, check_int, check_positive
from jaxkd.losses.core import Array, Reduction, reduce_loss, to_float
from jaxkd.losses.lm.alm import _offset_array, _token_mask_array

__all__ = ["uld", "uld_alignment", "uld_matched_vocabulary", "uld_positional_alignment"]

#: TRL's floor on a probability before its log (``clamp_min(1e-8)`` in the group merge and the matched JSD).
_PROB_FLOOR = 1e-8
_MERGES = ("bayesian", "observed")


# ----- host-side data preparation -----


def _walk(s_offsets: np.ndarray, t_offsets: np.ndarray) -> tuple[list[list[int]], list[list[int]]]:
    """GOLD's ``_align_by_byte_offsets``: advance the side whose current token ends earlier; a group closes
    when both sides end at the same byte; what is left when one side runs out is one last group."""
    s_groups, t_groups = [], []
    s_start = t_start = s = t = 0
    n_s, n_t = len(s_offsets), len(t_offsets)
    while s < n_s and t < n_t:
        s_end, t_end = s_offsets[s][1], t_offsets[t][1]
        if s_end < t_end:
            s += 1
        elif s_end > t_end:
            t += 1
        else:
            s += 1
            t += 1
            s_groups.append(list(range(s_start, s)))
            t_groups.append(list(range(t_start, t)))
            s_start, t_start = s, t
    if s < n_s or t < n_t:
        s_groups.append(list(range(s_start, n_s)))
        t_groups.append(list(range(t_start, n_t)))
    return s_groups, t_groups


def uld_alignment(
    student_byte_offsets,
    teacher_byte_offsets,
    *,
    student_mask=None,
    teacher_mask=None,
    num_groups: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups of the two tokenizations of the same completions, as GOLD aligns them (host, NumPy).

    TRL ``trl/experimental/gold/gold_trainer.py``, ``ULDLoss._align_by_byte_offsets`` then the filter of
    ``_compute_distillation_loss``: per sequence, the tokens with ``mask`` true are taken in order (GOLD's
    answer span: the completion tokens), and both sides are walked together, advancing the side whose current
    token ends earlier (by its end byte offset); a group closes when both current tokens end at the same byte.
    When one side runs out, the tokens left on either side form one last group, and a group with no token on
    one side is dropped (GOLD's ``paired`` filter: e.g. a trailing zero-width EOS). Groups are numbered
    ``0, 1, …`` in text order.

    Unlike :func:`jaxkd.losses.alm_chunk_alignment` (ALM's), nothing checks that a group's tokens tile the
    same bytes: GOLD trusts the end offsets (a trailing unfinished group is kept). On texts both
    tokenizations tile exactly and end at a common boundary the two functions give the same groups.

    Args:
      student_byte_offsets, teacher_byte_offsets: integer ``[T, 2]`` or ``[B, T, 2]`` (start, end) byte offsets
        into the same completion texts (per sequence), tokens in text order; only the ends are read.
      student_mask, teacher_mask: boolean ``[T]`` / ``[B, T]``: the tokens to align (the completion targets;
        padding and prompt False), or ``None`` for all. TRL's ``uld_skip_student_eos``/``uld_skip_teacher_eos``
        (its defaults) leave out each answer's last token: a mask without it.
      num_groups: the size ``G`` of the group axis (a static shape for ``jit``); ``None``: the largest count in
        the batch (at least 1). Fewer than found is an error.

    Returns:
      ``(student_group_ids [B, Ts], teacher_group_ids [B, Tt], group_mask [B, G])``: int32 group of each token
      (``-1``: none) and which group slots hold a group.
    """
    s_off = _offset_array("student_byte_offsets", student_byte_offsets)
    t_off = _offset_array("teacher_byte_offsets", teacher_byte_offsets)
    if s_off.shape[0] != t_off.shape[0]:
        raise ValueError(f"student and teacher offsets must cover the same batch, got {s_off.shape[0]} and "
                         f"{t_off.shape[0]} sequences")
    s_mask = _token_mask_array("student_mask", student_mask, s_off.shape[:2])
    t_mask = _token_mask_array("teacher_mask", teacher_mask, t_off.shape[:2])
    batch = s_off.shape[0]
    s_ids = np.full(s_off.shape[:2], -1, np.int32)
    t_ids = np.full(t_off.shape[:2], -1, np.int32)
    counts = []
    for b in range(batch):
        s_pos, t_pos = np.flatnonzero(s_mask[b]), np.flatnonzero(t_mask[b])
        s_groups, t_groups = _walk(s_off[b, s_pos], t_off[b, t_pos])
        paired = [(sg, tg) for sg, tg in zip(s_groups, t_groups) if sg and tg]
        for g, (sg, tg) in enumerate(paired):
            s_ids[b, s_pos[sg]] = g
            t_ids[b, t_pos[tg]] = g
        counts.append(len(paired))
    found = max(counts + [1])
    num_groups = found if num_groups is None else check_int("num_groups", num_groups, low=1)
    if num_groups < found:
        raise ValueError(f"num_groups={num_groups} is smaller than the {found} groups of the longest sequence")
    group_mask = np.arange(num_groups)[None, :] < np.asarray(counts)[:, None]
    return s_ids, t_ids, group_mask


def uld_positional_alignment(student_mask, teacher_mask, *, num_groups: int | None = None
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The original ULD's alignment: the ``k``-th completion token of one side with the ``k``-th of the other
    (host, NumPy).

    Boizard et al. (2024) compare the two answers position by position, truncated to the shorter one; TRL's
    ``ULDLoss`` does the same with ``use_extended_uld=False`` (``probs[:min_length]`` on both sides; for
    tokenizers without byte offsets, e.g. SentencePiece). In :func:`uld_alignment`'s format: group ``k`` holds
    the ``k``-th token with ``mask`` true on each side, for ``k < min(n_S, n_T)``.

    Args:
      student_mask, teacher_mask: boolean ``[T]`` / ``[B, T]``: the completion tokens (targets) of each side.
      num_groups: the size ``G`` of the group axis; ``None``: the largest count in the batch (at least 1).

    Returns:
      ``(student_group_ids [B, Ts], teacher_group_ids [B, Tt], group_mask [B, G])``.
    """
    s_mask = np.asarray(student_mask, bool)
    t_mask = np.asarray(teacher_mask, bool)
    s_mask, t_mask = (m[None] if m.ndim == 1 else m for m in (s_mask, t_mask))
    if s_mask.ndim != 2 or t_mask.ndim != 2 or s_mask.shape[0] != t_mask.shape[0]:
        raise ValueError(f"student_mask and teacher_mask must be [B, T] masks of the same batch, got shapes "
                         f"{np.shape(student_mask)} and {np.shape(teacher_mask)}")
    s_rank = np.where(s_mask, np.cumsum(s_mask, axis=1) - 1, -1)  # k for the k-th token, -1 off the mask
    t_rank = np.where(t_mask, np.cumsum(t_mask, axis=1) - 1, -1)
    counts = np.minimum(s_mask.sum(1), t_mask.sum(1))
    found = max(int(counts.max(initial=0)), 1)
    num_groups = found if num_groups is None else check_int("num_groups", num_groups, low=1)
    if num_groups < found:
        raise ValueError(f"num_groups={num_groups} is smaller than the {found} groups of the longest sequence")
    s_ids = np.where(s_rank < counts[:, None], s_rank, -1).astype(np.int32)
    t_ids = np.where(t_rank < counts[:, None], t_rank, -1).astype(np.int32)
    return s_ids, t_ids, np.arange(num_groups)[None, :] < counts[:, None]


def uld_matched_vocabulary(student_vocab: Mapping[str, int], teacher_vocab: Mapping[str, int]
                           ) -> tuple[np.ndarray, np.ndarray]:
    """The vocabulary entries the two tokenizers share, for :func:`uld`'s hybrid loss (host).

    TRL ``ULDLoss._initialize_vocabulary_mapping``: a teacher token whose string is also a student token maps to
    that student token. Returns ``(student_ids, teacher_ids)``, int32 ``[M]``, sorted by teacher id (the order of
    ``_compute_hybrid_uld_loss``). ``student_vocab``/``teacher_vocab`` map token strings to ids (a
    ``transformers`` tokenizer's ``get_vocab()``).
    """
    pairs = sorted((t_id, student_vocab[token]) for token, t_id in teacher_vocab.items() if token in student_vocab)
    teacher_ids = np.asarray([t for t, _ in pairs], np.int32)
    student_ids = np.asarray([s for _, s in pairs], np.int32)
    return student_ids, teacher_ids


# ----- the loss -----


def _merged_distributions(logits: Array, tokens: Array, group_ids: Array, num_groups: int, temperature: float,
                          merge: str) -> Array:
    """One (unnormalized) distribution per group, ``[B, G, V]``: TRL's ``_merge_probabilities_with_alignment_
    groups``. The base position's full distribution (the group's last position for ``"bayesian"``, its first for
    ``"observed"``) times the probabilities, floored at 1e-8, that the group's other positions give their tokens."""
    probs = jax.nn.softmax(to_float(logits) / temperature, axis=-1)
    member = group_ids >= 0
    ids = jnp.where(member, group_ids, num_groups)  # non-members go to a spare segment, dropped below
    position = jnp.broadcast_to(jnp.arange(logits.shape[1]), ids.shape)
    if merge == "bayesian":
        base = jax.vmap(lambda p, i: jax.ops.segment_max(p, i, num_segments=num_groups + 1))(position, ids)
    else:
        base = jax.vmap(lambda p, i: jax.ops.segment_min(p, i, num_segments=num_groups + 1))(position, ids)
    base = jnp.clip(base[:, :num_groups], 0, logits.shape[1] - 1)  # empty groups: any position (masked later)
    is_base = position == jnp.take_along_axis(base, jnp.minimum(ids, num_groups - 1), axis=1)
    token_prob = jnp.take_along_axis(probs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    log_factor = jnp.where(member & ~is_base, jnp.log(jnp.maximum(token_prob, _PROB_FLOOR)), 0.0)
    group_log_factor = jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=num_groups + 1))(log_factor, ids)
    base_probs = jnp.take_along_axis(probs, base[..., None], axis=1)  # [B, G, V]
    return base_probs * jnp.exp(group_log_factor[:, :num_groups, None])


def _sorted_l1(student: Array, teacher: Array) -> Array:
    """``Σ_v |sort↓(student)_v − sort↓(teacher)_v|`` over the last axis, the shorter padded with zeros."""
    size = max(student.shape[-1], teacher.shape[-1])
    pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])  # noqa: E731
    s = -jnp.sort(-pad(student), axis=-1)
    t = -jnp.sort(-pad(teacher), axis=-1)
    return jnp.sum(jnp.abs(s - t), axis=-1)


def _probability_jsd(student: Array, teacher: Array, beta: float) -> Array:
    """TRL's ``generalized_jsd_loss(..., logits_are_probs=True)`` per row before its reduction, summed over the
    last axis: ``log`` of the probabilities floored at 1e-8, then ``β=0``: KL(T‖S), ``β=1``: KL(S‖T), else
    ``β·KL(T‖M) + (1−β)·KL(S‖M)`` with ``log M = logsumexp(log S + log(1−β), log T + log β)``."""
    ls = jnp.log(jnp.maximum(student, _PROB_FLOOR))
    lt = jnp.log(jnp.maximum(teacher, _PROB_FLOOR))
    if beta == 0:
        value = jnp.exp(lt) * (lt - ls)
    elif beta == 1:
        value = jnp.exp(ls) * (ls - lt)
    else:
        lm = jnp.logaddexp(ls + np.log1p(-beta), lt + np.log(beta))
        value = beta * jnp.exp(lt) * (lt - lm) + (1 - beta) * jnp.exp(ls) * (ls - lm)
    return jnp.sum(value, axis=-1)


def _check_side(side: str, logits, tokens, group_ids, batch: int, num_groups: int) -> None:
    if jnp.ndim(logits) != 3 or jnp.shape(logits)[0] != batch:
        raise ValueError(f"{side}_logits must be [B, T, V] with B = {batch} (group_mask's batch), got shape "
                         f"{jnp.shape(logits)}")
    for name, value in ((f"{side}_tokens", tokens), (f"{side}_group_ids", group_ids)):
        if jnp.shape(value) != jnp.shape(logits)[:2]:
            raise ValueError(f"{name} must be [B, T] = {jnp.shape(logits)[:2]} ({side}_logits' first two axes), "
                             f"got shape {jnp.shape(value)}")
        if not jnp.issubdtype(jnp.result_type(value), jnp.integer):
            raise ValueError(f"{name} must be integers, got dtype {jnp.result_type(value)}")
    if not isinstance(group_ids, jax.core.Tracer) and np.size(group_ids):
        values = np.asarray(group_ids)
        if values.min() < -1 or values.max() >= num_groups:
            raise ValueError(f"{side}_group_ids must lie in [-1, {num_groups}) (-1: no group; group_mask has "
                             f"{num_groups} slots), got values in [{values.min()}, {values.max()}]")


def uld(
    student_logits: Array,
    teacher_logits: Array,
    student_tokens: Array,
    teacher_tokens: Array,
    student_group_ids: Array,
    teacher_group_ids: Array,
    group_mask: Array,
    *,
    merge: str = "bayesian",
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    matched_vocabulary: tuple[Array, Array] | None = None,
    beta: float = 0.5,
    matched_weight: float | None = None,
    unmatched_weight: float | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Universal Logit Distillation between two models with different vocabularies (per sequence).

    Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs"
    (2024), with the byte-offset alignment and hybrid loss of TRL's GOLD (``trl/experimental/gold/
    gold_trainer.py``, ``ULDLoss._compute_distillation_loss`` with ``use_extended_uld=True``; equal to it,
    tested). On each side, with ``p_t = softmax(logits_t / τ)`` and a group ``g`` of positions
    (:func:`uld_alignment`), the group's distribution is (``_merge_probabilities_with_alignment_groups``)::

        bayesian:  P_g = p_last(g) · Π_{t ∈ g, t ≠ last}  max(p_t(tokens_t), 1e-8)     (chain rule)
        observed:  P_g = p_first(g) · Π_{t ∈ g, t ≠ first} max(p_t(tokens_t), 1e-8)

    and per group, with ``P^S_g, P^T_g`` padded with zeros to the larger vocabulary::

        plain:   ℓ_g = Σ_v | sort↓(P^S_g)_v − sort↓(P^T_g)_v |
        hybrid:  ℓ_g = w_m · GJSD_β(P^S_g[matched_S], P^T_g[matched_T])
                     + w_u · Σ_v | sort↓(P^S_g[unmatched_S])_v − sort↓(P^T_g[unmatched_T])_v |

    (``GJSD_β``: TRL's generalized JSD of the floored probabilities, β = 0 forward KL, 1 reverse; ``w_m = M/V_T``,
    ``w_u = 1 − w_m`` unless ``matched_weight``/``unmatched_weight`` are given; the unmatched term is 0 when a
    side has no unmatched entry). A sequence's loss is the mean of ``ℓ_g`` over its groups (0 without any);
    the reduction is over sequences (TRL: the mean over the batch, empty sequences included).

    What the positions mean is the caller's: position ``t`` of ``*_logits`` is the distribution whose
    probability of ``*_tokens[t]`` a merge reads. For ``"bayesian"`` pass the next-token logits and their
    targets (``logits[:, :-1]``, ``tokens[:, 1:]``: ``p_t`` predicts ``tokens_t``); TRL's ``"observed"`` (its
    default) reads the logits *at* each answer token (``logits[:, 1:]`` with ``tokens[:, 1:]``): the
    distribution at a token's own position, which predicts the next one.

    Args:
      student_logits, teacher_logits: ``[B, Ts, Vs]`` / ``[B, Tt, Vt]``.
      student_tokens, teacher_tokens: integer ``[B, Ts]`` / ``[B, Tt]``, the token read at each position.
      student_group_ids, teacher_group_ids: integer ``[B, Ts]`` / ``[B, Tt]`` group of each position (``-1``:
        none), as :func:`uld_alignment` returns.
      group_mask: boolean ``[B, G]``: the group slots that hold a group.
      merge: ``"bayesian"`` (default: the chain rule) or ``"observed"`` (TRL's default).
      student_temperature, teacher_temperature: ``τ > 0`` of each side (TRL's ``uld_*_temperature``).
      matched_vocabulary: ``(student_ids, teacher_ids)`` ``[M]`` of the shared entries
        (:func:`uld_matched_vocabulary`): the hybrid loss; ``None``: the plain one.
      beta: the hybrid's JSD ``β ∈ [0, 1]`` (TRL's ``GOLDConfig.beta``, default 0.5).
      matched_weight, unmatched_weight: fixed hybrid weights (both or neither).
      weights: optional float ``[B]`` per-sequence weights.
      reduction: ``"mean"`` over sequences, ``"sum"`` or ``"none"`` (``[B]``).
    """
    check_choice("merge", merge, _MERGES)
    check_positive("student_temperature", student_temperature)
    check_positive("teacher_temperature", teacher_temperature)
    if np.ndim(group_mask) != 2:
        raise ValueError(f"group_mask must be [B, G], got shape {np.shape(group_mask)}")
    batch, num_groups = np.shape(group_mask)
    _check_side("student", student_logits, student_tokens, student_group_ids, batch, num_groups)
    _check_side("teacher", teacher_logits, teacher_tokens, teacher_group_ids, batch, num_groups)
    if (matched_weight is None) != (unmatched_weight is None):
        raise ValueError(f"matched_weight and unmatched_weight are set together (both or neither), got "
                         f"matched_weight={matched_weight}, unmatched_weight={unmatched_weight}")
    ps = _merged_distributions(student_logits, student_tokens, student_group_ids, num_groups, student_temperature,
                               merge)
    pt = _merged_distributions(teacher_logits, teacher_tokens, teacher_group_ids, num_groups, teacher_temperature,
                               merge)
    vs, vt = ps.shape[-1], pt.shape[-1]
    if matched_vocabulary is None:
        per_group = _sorted_l1(ps, pt)
    else:
        check_in_range("beta", beta, 0.0, 1.0)
        if any(isinstance(ids, jax.core.Tracer) for ids in matched_vocabulary):
            raise ValueError("matched_vocabulary must be host arrays (constants of the compiled loss), got traced "
                             "values: bind it outside jit (jaxkd.methods.uld does)")
        s_ids, t_ids = (np.asarray(ids) for ids in matched_vocabulary)
        if s_ids.ndim != 1 or s_ids.shape != t_ids.shape or not np.issubdtype(s_ids.dtype, np.integer) \
                or not np.issubdtype(t_ids.dtype, np.integer):
            raise ValueError(f"matched_vocabulary must be two integer arrays [M] of the same length, got shapes "
                             f"{s_ids.shape} and {t_ids.shape}")
        if s_ids.size and (s_ids.min() < 0 or s_ids.max() >= vs or t_ids.min() < 0 or t_ids.max() >= vt):
            raise ValueError(f"matched_vocabulary ids must lie in the vocabularies ([0, {vs}) student, [0, {vt}) "
                             f"teacher), got [{s_ids.min()}, {s_ids.max()}] and [{t_ids.min()}, {t_ids.max()}]")
        if len(np.unique(s_ids)) != s_ids.size or len(np.unique(t_ids)) != t_ids.size:
            raise ValueError("matched_vocabulary must pair each student and each teacher id at most once")
        num_matched = s_ids.size
        if matched_weight is None:
            matched_weight = num_matched / max(1, vt)
            unmatched_weight = 1.0 - matched_weight
        matched = _probability_jsd(ps[..., s_ids], pt[..., t_ids], beta) if num_matched else 0.0
        if num_matched < vs and num_matched < vt:
            # Zeroed matched entries sort after every unmatched one: the L1 of the sorted unmatched entries.
            s_unmatched = ps * jnp.asarray(~np.isin(np.arange(vs), s_ids), ps.dtype)
            t_unmatched = pt * jnp.asarray(~np.isin(np.arange(vt), t_ids), pt.dtype)
            unmatched = _sorted_l1(s_unmatched, t_unmatched)
        else:
            unmatched = 0.0
        per_group = matched_weight * matched + unmatched_weight * unmatched
    group_mask = jnp.asarray(group_mask, bool)
    count = jnp.sum(group_mask, axis=1)
    total = jnp.sum(jnp.where(group_mask, per_group, 0.0), axis=1)
    per_sequence = jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)
    return reduce_loss(per_sequence, weights=weights, reduction=reduction)
