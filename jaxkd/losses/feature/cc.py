"""Correlation congruence: match how the student's and the teacher's embeddings of neighbouring
examples co-vary, as RepDistiller's ``Correlation`` computes it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.losses.core import Array, flatten_features, relational_loss

__all__ = ["cc"]


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
