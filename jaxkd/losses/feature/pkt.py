"""Probabilistic knowledge transfer: match the conditional distributions of cosine similarities."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_positive
from jaxkd.losses.core import Array, flatten_features, relational_loss, safe_sqrt

__all__ = ["pkt"]


@relational_loss
def pkt(student: Array, teacher: Array, *, eps: float = 1e-7, example_weights: Array) -> Array:
    """Probabilistic knowledge transfer: ``mean_{i,j} q_ij log((q_ij + ε) / (p_ij + ε))`` over the batch.

    Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018.
    Each embedding is normalized, ``x̂ = x / (‖x‖ + ε)``; the cosine kernel ``K_ij = (x̂_i·x̂_j + 1)/2``
    is turned into conditional probabilities by normalizing each row, ``p_ij = K_ij / Σ_k K_ik`` (the
    student, ``q`` the teacher), and the loss is the KL divergence ``KL(q ‖ p)``, averaged over the
    ``B²`` pairs. Follows the authors' code as RepDistiller ships it (``distiller_zoo/PKT.py``,
    ``cosine_similarity_loss``; ``ε = 1e-7``), where the diagonal ``i = j`` stays in. That code replaces
    NaN by 0 after normalizing; here a NaN propagates (the project's convention: a corrupt input is
    visible). With a mask the rows, their normalization and the mean cover only the valid examples.

    Args:
      student, teacher: embeddings ``[B, ...]`` (flattened per example; the dimensions may differ).
      eps: ``ε``, the normalization and logarithm guard (> 0).
    """
    check_positive("eps", eps)
    if np.shape(student)[:1] != np.shape(teacher)[:1]:
        raise ValueError(f"pkt: student and teacher have different batch sizes, shapes {np.shape(student)} and {np.shape(teacher)}")
    s, t = flatten_features(student), flatten_features(teacher)
    w = jnp.asarray(example_weights, s.dtype)
    valid = w > 0

    def conditional(x):
        x = jnp.where(valid[:, None], x, 0.0)  # masked rows may hold anything finite; they never count
        x = x / (safe_sqrt(jnp.sum(x * x, axis=-1, keepdims=True)) + eps)
        k = (x @ x.T + 1.0) / 2.0 * w[None, :]
        total = jnp.sum(k, axis=-1, keepdims=True)
        return k / jnp.where(total > 0, total, 1.0)

    p, q = conditional(s), conditional(t)
    pair = w[:, None] * w[None, :]
    terms = jnp.where(pair > 0, q * jnp.log((q + eps) / (p + eps)), 0.0)
    n = jnp.sum(w)
    return jnp.where(n > 0, jnp.sum(terms) / jnp.where(n > 0, n * n, 1.0), 0.0)
