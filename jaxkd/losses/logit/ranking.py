"""Ranking distillation: Margin-MSE and listwise KL over a query's candidate scores.

Scores are ``[B, N]``: for each of ``B`` queries, the relevance scores of ``N`` candidate documents
(``candidate_mask`` ``[B, N]`` marks the real candidates of ragged lists; padding may hold anything
finite).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_temperature
from jaxkd.losses.core import Array, kl_from_log_probs, log_softmax, per_example_loss, to_float

__all__ = ["listwise_kd", "margin_mse"]


def _check_scores(student_scores, teacher_scores, candidate_mask, *, min_candidates: int) -> None:
    s, t = np.shape(student_scores), np.shape(teacher_scores)
    if len(s) != 2 or s != t:
        raise ValueError(
            f"scores must be [batch, num_candidates] of one shape, got student_scores {s} and teacher_scores {t}"
        )
    if s[1] < min_candidates:
        raise ValueError(f"the loss needs at least {min_candidates} candidates per query, got scores of shape {s}")
    if candidate_mask is not None and np.shape(candidate_mask) != s:
        raise ValueError(f"candidate_mask must have the scores' shape {s}, got {np.shape(candidate_mask)}")


@per_example_loss
def margin_mse(student_scores: Array, teacher_scores: Array, *, candidate_mask: Array | None = None) -> Array:
    """Margin-MSE (Hofstätter, Althammer, Schröder, Sertkan & Hanbury, "Improving Efficient Neural Ranking
    Models with Cross-Architecture Knowledge Distillation", arXiv:2010.02666, 2020), per query.

    Column 0 holds the positive passage ``d⁺``, columns ``1..N−1`` negatives ``d⁻_j``:

    ``L = mean_j [ (s(q,d⁺) − s(q,d⁻_j)) − (t(q,d⁺) − t(q,d⁻_j)) ]²``

    over the valid negatives ``j`` (``candidate_mask``). With ``N = 2`` (training triples) the batch mean
    is exactly the official ``torch.nn.MSELoss()(student_pos − student_neg, teacher_pos − teacher_neg)``
    of github.com/sebastian-hofstaetter/matchmaker (the code behind
    github.com/sebastian-hofstaetter/neural-ranking-kd); several negatives per query average their squared
    margin errors (the multi-negative form of sentence-transformers' ``MarginMSELoss``). Only margins are
    matched, so the student's scores may live on another scale offset than the teacher's. A query without
    a valid negative has loss 0; the positive (column 0) is assumed valid.

    Args:
      student_scores, teacher_scores: ``[B, N]``, ``N >= 2``, positive first.
      candidate_mask: boolean ``[B, N]``, the real candidates (default all).
    """
    _check_scores(student_scores, teacher_scores, candidate_mask, min_candidates=2)
    s, t = to_float(student_scores), to_float(teacher_scores)
    dtype = jnp.promote_types(s.dtype, t.dtype)
    s, t = s.astype(dtype), t.astype(dtype)
    err = (s[:, :1] - s[:, 1:]) - (t[:, :1] - t[:, 1:])
    sq = err * err
    if candidate_mask is None:
        return jnp.mean(sq, axis=-1)
    valid = jnp.asarray(candidate_mask, bool)[:, 1:]
    count = jnp.sum(valid, axis=-1)
    total = jnp.sum(jnp.where(valid, sq, 0.0), axis=-1)
    return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


@per_example_loss
def listwise_kd(
    student_scores: Array,
    teacher_scores: Array,
    *,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    candidate_mask: Array | None = None,
) -> Array:
    """Listwise ranking distillation, per query:

    ``L = KL( softmax_j(t_j / τ_t) ‖ softmax_j(s_j / τ) )``

    over the query's valid candidates ``j`` (``candidate_mask``; excluded candidates have probability 0
    and receive zero gradients). This is the listwise distillation objective of Tamber, Kazi, Sourabh &
    Lin, "Teaching Dense Retrieval Models to Specialize with Listwise Distillation and LLM Data
    Augmentation", 2025 (a cross-encoder teacher's scores over the candidate list as the target
    distribution of the retriever's scores), the form RocketQAv2 and sentence-transformers'
    ``DistillKLDivLoss`` share. ``τ_t`` (``teacher_temperature``) defaults to ``τ``; the scale of the
    term is left to the method weight (no ``T²`` factor, unlike Hinton's KD).

    Args:
      student_scores, teacher_scores: ``[B, N]``.
      temperature: ``τ``, dividing the student's scores.
      teacher_temperature: ``τ_t``, dividing the teacher's scores (default ``τ``).
      candidate_mask: boolean ``[B, N]``, the real candidates (default all).
    """
    check_temperature("temperature", temperature)
    if teacher_temperature is None:
        teacher_temperature = temperature
    check_temperature("teacher_temperature", teacher_temperature)
    _check_scores(student_scores, teacher_scores, candidate_mask, min_candidates=1)
    s, t = to_float(student_scores), to_float(teacher_scores)
    dtype = jnp.promote_types(s.dtype, t.dtype)
    s, t = s.astype(dtype), t.astype(dtype)
    if candidate_mask is not None:
        valid = jnp.asarray(candidate_mask, bool)
        s = jnp.where(valid, s, -jnp.inf)
        t = jnp.where(valid, t, -jnp.inf)
    return kl_from_log_probs(log_softmax(t, teacher_temperature), log_softmax(s, temperature))
