"""Contrastive representation distillation (CRD): the NCE objective over a memory bank of embeddings.

Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020; the formulas follow the
official code (HobbitLong/RepDistiller, ``crd/criterion.py`` and ``crd/memory.py``): the NCE loss of
``ContrastLoss``, the scores and the momentum update of ``ContrastMemory``. The memory banks, the
normalization constants ``Z`` and the negative sampling live in the method
(:func:`jaxkd.methods.crd`); these are the pure pieces.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxkd.checks import check_int, check_positive, check_temperature
from jaxkd.losses.core import Array, per_example_loss, to_float

__all__ = ["crd", "crd_nce", "crd_partition_constant", "crd_scores"]

#: ``eps`` of RepDistiller's ``ContrastLoss``.
NCE_EPS = 1e-7


def _nce(x: Array, num_examples: int) -> Array:
    m = x.shape[-1] - 1
    noise = m / float(num_examples)  # m · Pn with Pn = 1 / N
    positive = jnp.log(x[..., 0] / (x[..., 0] + noise + NCE_EPS))
    negatives = jnp.sum(jnp.log(noise / (x[..., 1:] + noise + NCE_EPS)), axis=-1)
    return -(positive + negatives)


@per_example_loss
def crd_nce(probs: Array, *, num_examples: int) -> Array:
    """CRD's NCE loss (RepDistiller ``ContrastLoss``, the paper's Eq. 18), per example.

    ``probs`` ``[B, 1 + m]`` holds each example's unnormalized model probabilities ``x = exp(s/T)/Z``:
    column 0 the positive pair, columns ``1..m`` the ``m`` negatives. With ``Pn = 1/N`` (uniform noise
    over the ``N = num_examples`` memory entries) and ``eps = 1e-7``:

    ``l_b = −log(x_b0 / (x_b0 + m·Pn + eps)) − Σ_k log(m·Pn / (x_bk + m·Pn + eps))``

    The mean over the batch is the official value (``−(Σ log D1 + Σ log D0) / bsz``).
    """
    num_examples = check_int("num_examples", num_examples, low=1)
    x = to_float(probs)
    if x.ndim != 2 or x.shape[-1] < 2:
        raise ValueError(f"crd_nce takes probs [batch, 1 + num_negatives] with at least one negative, got shape {x.shape}")
    return _nce(x, num_examples)


def crd_scores(embedding: Array, memory_rows: Array, *, temperature: float) -> Array:
    """``exp(⟨memory_rows[b, k], embedding[b]⟩ / T)``, ``[B, K + 1]`` (RepDistiller ``ContrastMemory``:
    ``exp(bmm(weight, v) / T)``). The caller gradient-stops ``memory_rows`` (the official code detaches
    the bank rows)."""
    check_temperature("temperature", temperature)
    e, rows = to_float(embedding), to_float(memory_rows)
    if e.ndim != 2 or rows.ndim != 3 or rows.shape[0] != e.shape[0] or rows.shape[-1] != e.shape[-1]:
        raise ValueError(
            f"crd_scores takes embedding [B, D] and memory_rows [B, K + 1, D], got shapes {e.shape} and {rows.shape}"
        )
    return jnp.exp(jnp.einsum("bkd,bd->bk", rows, e) / temperature)


@per_example_loss
def crd(
    student_embedding: Array,
    teacher_embedding: Array,
    student_memory_rows: Array,
    teacher_memory_rows: Array,
    *,
    z_student: float,
    z_teacher: float,
    num_examples: int,
    temperature: float = 0.07,
) -> Array:
    """The CRD loss (Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020), per
    example, as RepDistiller's ``CRDLoss`` computes it:

    ``out_s = exp(M_t[idx] · e_s / T) / Z_s``, ``out_t = exp(M_s[idx] · e_t / T) / Z_t``,
    ``l = crd_nce(out_s) + crd_nce(out_t)``

    — the student embedding is contrasted against the *teacher's* memory bank rows and vice versa (the
    paper's two symmetric terms). ``idx[b] = [its own index (positive), K negatives]``.

    Args:
      student_embedding, teacher_embedding: ``[B, D]`` L2-normalized embeddings ``e_s``, ``e_t``.
      student_memory_rows, teacher_memory_rows: ``[B, K + 1, D]``: the student and teacher banks' rows
        at ``idx`` (gradient-stopped by the caller, as the official code detaches them).
      z_student, z_teacher: the normalization constants ``Z_s``, ``Z_t`` (the official code sets them
        once, on the first step, to ``mean(exp(scores/T)) · N``: :func:`crd_partition_constant`).
      num_examples: ``N``, the number of memory entries (``Pn = 1/N``).
      temperature: ``T`` (``nce_t``, 0.07).
    """
    num_examples = check_int("num_examples", num_examples, low=1)
    check_positive("z_student", z_student)
    check_positive("z_teacher", z_teacher)
    e_s, e_t = to_float(student_embedding), to_float(teacher_embedding)
    rows_s, rows_t = to_float(student_memory_rows), to_float(teacher_memory_rows)
    if e_s.shape != e_t.shape or e_s.ndim != 2:
        raise ValueError(
            f"crd takes student and teacher embeddings of one shape [B, D], got {e_s.shape} and {e_t.shape}"
        )
    if rows_s.shape != rows_t.shape or rows_s.ndim != 3 or rows_s.shape[0] != e_s.shape[0] or rows_s.shape[-1] != e_s.shape[-1]:
        raise ValueError(
            f"crd takes memory rows [B, K + 1, D] matching the embeddings {e_s.shape}, got student rows "
            f"{rows_s.shape} and teacher rows {rows_t.shape}"
        )
    if rows_s.shape[1] < 2:
        raise ValueError(f"crd needs at least one negative: memory rows [B, K + 1, D], got {rows_s.shape}")
    out_s = crd_scores(e_s, rows_t, temperature=temperature) / z_student
    out_t = crd_scores(e_t, rows_s, temperature=temperature) / z_teacher
    return _nce(out_s, num_examples) + _nce(out_t, num_examples)


def crd_partition_constant(scores: Array, num_examples: int, mask: Array | None = None) -> Array:
    """``Z = mean(scores) · N``, the mean over every entry of the valid examples' ``[B, K + 1]`` scores
    (RepDistiller sets ``Z_v1 = out_v1.mean() * outputSize`` once, on the first forward pass)."""
    scores = to_float(scores)
    if mask is None:
        return jnp.mean(scores) * num_examples
    w = jnp.asarray(mask, scores.dtype)[:, None] * jnp.ones_like(scores)
    total = jnp.sum(jnp.where(w > 0, scores, 0.0))
    return total / jnp.maximum(jnp.sum(w), 1.0) * num_examples
