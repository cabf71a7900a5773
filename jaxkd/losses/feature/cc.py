"""Correlation congruence: match how the student's and the teacher's embeddings of neighbouring
examples co-vary, as RepDistiller's ``Correlation`` computes it (:func:`cc`), or the paper's kernel
correlation matrices as torchdistill computes them (:func:`cc_kernel`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_choice, check_int, check_positive
from jaxkd.losses.core import Array, flatten_features, relational_loss, safe_sqrt

__all__ = ["cc", "cc_kernel"]


@relational_loss
def cc(student_embedding: Array, teacher_embedding: Array, *, example_weights: Array) -> Array:
    """Correlation congruence (Peng et al., "Correlation Congruence for Knowledge Distillation",
    ICCV 2019), as the official code computes it.

    With ``δ_i = |e_s,i − e_t,i|`` (elementwise, ``e`` the embeddings flattened to ``[B, D]``, same ``D``)
    and the examples in batch order:

    ``L = 1/(B−1) · Σ_{i=1}^{B−1} Σ_d δ_{i,d} · δ_{i+1,d}``

    This is RepDistiller's ``Correlation`` (``distiller_zoo/CC.py``, "code emailed to me by the original
    author"), which RepDistiller applies to trainable linear embeddings (``LinearEmbed``, 128-d, no
    normalization) of the student's and the teacher's pooled features, with weight ``β = 0.02``.

    How it differs from the paper: the paper builds, for student and teacher separately, the ``B x B``
    correlation matrix ``C_ij = k(f_i, f_j)`` with a Gaussian RBF kernel approximated by its ``P``-th
    order Taylor expansion, and penalizes ``‖C_s − C_t‖² / B²`` (Eq. 5–9), with a class-balanced
    sampler. The official code instead correlates the student–teacher *residuals* of consecutive
    examples — a product of absolute differences, no kernel — so the value depends on the batch order
    (it is not permutation invariant, unlike the paper's).

    With a mask, the consecutive pairs are those of the unmasked examples in batch order (masked examples
    are skipped, as if removed from the batch); fewer than 2 unmasked examples give 0.

    Args:
      student_embedding: ``[B, ...]``.
      teacher_embedding: ``[B, ...]`` of the student's shape.
    """
    s, t = np.shape(student_embedding), np.shape(teacher_embedding)
    if len(s) < 1 or s != t:
        raise ValueError(f"cc needs student and teacher embeddings of one shape [B, ...], got student {s} and teacher {t}")
    es, et = flatten_features(student_embedding), flatten_features(teacher_embedding)
    dtype = jnp.promote_types(es.dtype, et.dtype)
    delta = jnp.abs(es.astype(dtype) - et.astype(dtype))
    b = s[0]
    valid = example_weights > 0
    index = jnp.arange(b)
    # next_valid[i]: the first unmasked example after i (b when none).
    candidates = jnp.where(valid, index, b)
    after = jnp.concatenate([candidates[1:], jnp.array([b], candidates.dtype)])
    next_valid = jax.lax.cummin(after, axis=0, reverse=True)
    has_pair = valid & (next_valid < b)
    neighbour = delta[jnp.minimum(next_valid, b - 1)]
    products = jnp.sum(delta * neighbour, axis=-1)
    pairs = jnp.sum(has_pair)
    total = jnp.sum(jnp.where(has_pair, products, 0.0))
    return jnp.where(pairs > 0, total / jnp.maximum(pairs, 1), 0.0).astype(dtype)


@relational_loss
def cc_kernel(
    student_embedding: Array,
    teacher_embedding: Array,
    *,
    kernel: str = "gaussian",
    gamma: float = 0.4,
    order: int = 2,
    example_weights: Array,
) -> Array:
    """Correlation congruence in the paper's form (Peng et al., "Correlation Congruence for Knowledge
    Distillation", ICCV 2019, Eq. 5–9), as torchdistill's ``CCKDLoss`` computes it.

    For each side separately (``e`` the embeddings flattened to ``[B, D]``; the two ``D`` may differ) the
    ``B x B`` correlation matrix is, with ``kernel="gaussian"``, the ``P``-th order Taylor expansion of the
    Gaussian RBF kernel ``exp(−γ‖x − y‖²) = exp(−2γ)·exp(2γ x·y)`` for unit vectors:

    ``C_ij = exp(−2γ) · Σ_{p=0}^{P} (2γ)^p / p! · (e_i·e_j)^p``

    and with ``kernel="bilinear"`` ``C_ij = e_i·e_j``. The loss is the Frobenius distance over ``B²``:

    ``L = ‖C_s − C_t‖_F / B²``

    This is torchdistill's ``CCKDLoss`` with ``reduction="batchmean"`` (``torchdistill/losses/mid_level.py``,
    yoshitomo-matsubara/torchdistill at 3e4373c): ``torch.dist(C_s, C_t, 2) / B²``, the distance itself,
    not its square as the paper's ``‖C_s − C_t‖²`` reads — so torchdistill configs' weights carry over
    (its ImageNet sample: ``gamma: 0.4``, ``max_p: 2``, on ``Linear4CCKD`` embeddings, linear maps of the
    pooled features with no normalization). The expansion is applied to the embeddings as they are: the
    identity it approximates holds for unit vectors only, and neither torchdistill nor this function
    normalizes them. Not the authors' released form: :func:`cc` is RepDistiller's (consecutive residual
    products, no kernel).

    With a mask, ``C`` covers the unmasked examples only and ``B`` is their number (0 when none).

    Args:
      student_embedding, teacher_embedding: ``[B, ...]`` (flattened per example).
      kernel: ``"gaussian"`` (the Taylor-expanded RBF) or ``"bilinear"``.
      gamma: ``γ > 0`` of the Gaussian kernel (torchdistill's ``gamma``).
      order: ``P ≥ 1``, the expansion's order (torchdistill's ``max_p``).
    """
    check_choice("kernel", kernel, ("gaussian", "bilinear"))
    check_positive("gamma", gamma)
    order = check_int("order", order, low=1)
    s, t = np.shape(student_embedding), np.shape(teacher_embedding)
    if len(s) < 1 or len(t) < 1 or s[0] != t[0]:
        raise ValueError(f"cc_kernel needs embeddings [B, ...] of one batch size, got student {s} and teacher {t}")
    w = jnp.asarray(example_weights)
    valid = w > 0

    def correlation(x):
        x = flatten_features(x)
        x = jnp.where(valid[:, None], x, 0.0)  # masked rows may hold anything finite; they never count
        dots = x @ x.T
        if kernel == "bilinear":
            return dots
        series = sum((2.0 * gamma) ** p / math.factorial(p) * dots**p for p in range(1, order + 1))
        return math.exp(-2.0 * gamma) * (1.0 + series)

    cs, ct = correlation(student_embedding), correlation(teacher_embedding)
    dtype = jnp.promote_types(cs.dtype, ct.dtype)
    pair = (valid[:, None] & valid[None, :])
    diff = jnp.where(pair, cs.astype(dtype) - ct.astype(dtype), 0.0)
    n = jnp.sum(valid).astype(dtype)
    return jnp.where(n > 0, safe_sqrt(jnp.sum(diff * diff)) / jnp.where(n > 0, n * n, 1.0), 0.0)
