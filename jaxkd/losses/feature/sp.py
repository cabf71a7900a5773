"""Similarity-preserving knowledge distillation: match the batch's pairwise-similarity (Gram) matrices."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxkd.losses.core import Array, flatten_features, relational_loss, safe_sqrt

__all__ = ["sp"]


@relational_loss
def sp(student_features: Array, teacher_features: Array, *, example_weights: Array) -> Array:
    """Similarity-preserving loss (Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019).

    With ``F_s [B, D_s]``, ``F_t [B, D_t]`` the features flattened per example (any ``[B, ...]`` shape:
    NHWC maps, embeddings; student and teacher widths may differ):

    ``G = F Fᵀ [B, B]``, ``Ĝ = G`` with every row L2-normalized, ``L = ‖Ĝ_t − Ĝ_s‖_F² / B²``

    (Eq. 1–4 of the paper, for one layer pair). Follows RepDistiller's ``Similarity``
    (``distiller_zoo/SP.py``, "verified by original author"): rows are normalized with
    ``F.normalize`` semantics (a zero row stays zero), and RepDistiller applies it to the last feature
    map (``feat[-2]``, here ``stage3``) with weight ``β = 3000``. Several layer pairs (the paper's sum
    over ``(l, l')``) are several calls.

    The loss depends only on the relations: permuting the batch permutes both Gram matrices alike and
    leaves it unchanged.

    Args:
      student_features: ``[B, ...]``.
      teacher_features: ``[B, ...]`` with the same ``B``.
    """
    s, t = np.shape(student_features), np.shape(teacher_features)
    if len(s) < 1 or len(t) < 1 or s[0] != t[0]:
        raise ValueError(f"sp needs [B, ...] features with the same batch size, got student {s} and teacher {t}")
    w = example_weights
    n = jnp.sum(w)
    pair = w[:, None] * w[None, :]

    def normalized_gram(x: Array) -> Array:
        f = flatten_features(x)
        g = (f @ f.T) * pair.astype(f.dtype)  # relations with a masked example are removed
        norm = safe_sqrt(jnp.sum(g * g, axis=1, keepdims=True))
        return g / jnp.maximum(norm, 1e-12)

    gs, gt = normalized_gram(student_features), normalized_gram(teacher_features)
    dtype = jnp.promote_types(gs.dtype, gt.dtype)
    diff = gt.astype(dtype) - gs.astype(dtype)
    total = jnp.sum(diff * diff)
    return jnp.where(n > 0, total / jnp.maximum(n, 1.0) ** 2, 0.0).astype(diff.dtype)
