"""Relational knowledge distillation: match the distances between the batch's embeddings and the angles
of their triplets."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_nonnegative
from jaxkd.losses.core import Array, flatten_features, l2_normalize, relational_loss, safe_sqrt, squared_distances

__all__ = ["rkd", "rkd_terms"]


def _huber(x: Array) -> Array:
    """PyTorch's ``smooth_l1_loss`` (``beta = 1``) per element: ``x²/2`` for ``|x| < 1``, else ``|x| − 1/2``."""
    ax = jnp.abs(x)
    return jnp.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


def _normalized_distances(x: Array, pair: Array) -> Array:
    """``‖x_i − x_j‖ / μ`` with ``μ`` the mean distance over the valid pairs ``i ≠ j`` (0 where ``μ = 0``)."""
    d = safe_sqrt(squared_distances(x)) * pair
    count = jnp.sum(pair)
    mean = jnp.sum(d) / jnp.maximum(count, 1.0)
    positive = mean > 0
    return jnp.where(positive, d / jnp.where(positive, mean, 1.0), 0.0)


def _angles(x: Array) -> Array:
    """``a_ijk = ⟨(x_j − x_i)/‖x_j − x_i‖, (x_k − x_i)/‖x_k − x_i‖⟩`` (``[B, B, B]``; 0 when ``j = i`` or ``k = i``)."""
    u = l2_normalize(x[None, :, :] - x[:, None, :], axis=-1)  # u[i, j] = unit vector from x_i to x_j
    return jnp.einsum("ijd,ikd->ijk", u, u)


@relational_loss
def rkd_terms(student_embedding: Array, teacher_embedding: Array, *, example_weights: Array) -> tuple[Array, Array]:
    """RKD's two terms, ``(distance-wise, angle-wise)``, unweighted (see :func:`rkd`)."""
    s, t = np.shape(student_embedding), np.shape(teacher_embedding)
    if len(s) < 1 or len(t) < 1 or s[0] != t[0]:
        raise ValueError(
            f"rkd needs [B, ...] embeddings with the same batch size, got student {s} and teacher {t}"
        )
    xs, xt = flatten_features(student_embedding), flatten_features(teacher_embedding)
    dtype = jnp.promote_types(xs.dtype, xt.dtype)
    xs, xt = xs.astype(dtype), xt.astype(dtype)
    w = example_weights.astype(dtype)
    n = jnp.sum(w)
    b = s[0]
    pair = w[:, None] * w[None, :] * (1.0 - jnp.eye(b, dtype=dtype))
    distance = jnp.sum(_huber(_normalized_distances(xs, pair) - _normalized_distances(xt, pair)) * pair)
    triple = w[:, None, None] * w[None, :, None] * w[None, None, :]
    angle = jnp.sum(_huber(_angles(xs) - _angles(xt)) * triple)
    enough = n >= 2
    n = jnp.maximum(n, 1.0)
    return jnp.where(enough, distance / n**2, 0.0), jnp.where(enough, angle / n**3, 0.0)


@relational_loss
def rkd(
    student_embedding: Array,
    teacher_embedding: Array,
    *,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    example_weights: Array,
) -> Array:
    """Relational knowledge distillation (Park, Kim, Lu & Cho, "Relational Knowledge Distillation",
    CVPR 2019): ``λ_D · L_RKD-D + λ_A · L_RKD-A``.

    With ``x`` the embeddings flattened to ``[B, D]`` (student and teacher widths may differ) and ``ℓ``
    the Huber loss with ``δ = 1`` (PyTorch's ``smooth_l1_loss``):

    * distance-wise: ``ψ_D(i, j) = ‖x_i − x_j‖ / μ``, ``μ`` the mean of ``‖x_i − x_j‖`` over the pairs
      ``i ≠ j``; ``L_RKD-D = 1/B² · Σ_{i,j} ℓ(ψ_D^s(i, j) − ψ_D^t(i, j))`` (Eq. 4–5);
    * angle-wise: ``ψ_A(i, j, k) = ⟨e_ij, e_ik⟩``, ``e_ij = (x_j − x_i)/‖x_j − x_i‖`` (0 for ``j = i``);
      ``L_RKD-A = 1/B³ · Σ_{i,j,k} ℓ(ψ_A^s − ψ_A^t)`` (Eq. 6–7).

    Follows RepDistiller's ``RKDLoss`` (``distiller_zoo/RKD.py``, the same as the authors' code and
    mdistiller's): the means run over all ``B²`` pairs and ``B³`` triplets including the degenerate
    ones (whose terms are 0), ``λ_D = 25``, ``λ_A = 50``, on the pooled embedding (``feat[-1]``),
    RepDistiller weight ``β = 1``. Differences, numerical only: distances are computed from
    differences (no ``‖a‖² + ‖b‖² − 2ab`` cancellation, no ``1e-12`` clamp), so two identical
    embeddings are at distance exactly 0 (RepDistiller: ``1e-6``); all-equal embeddings (``μ = 0``)
    give normalized distances 0 instead of NaN.

    Both terms are invariant to rotating, reflecting, translating or scaling either embedding, and to
    the order of the batch.

    Args:
      student_embedding, teacher_embedding: ``[B, ...]``.
      distance_weight: ``λ_D >= 0``.
      angle_weight: ``λ_A >= 0``.
    """
    check_nonnegative("distance_weight", distance_weight)
    check_nonnegative("angle_weight", angle_weight)
    distance, angle = rkd_terms(student_embedding, teacher_embedding, mask=example_weights > 0)
    return distance_weight * distance + angle_weight * angle
