"""DIST+'s feature terms: channel and spatial Pearson relations of the last feature map."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_positive
from jaxkd.losses.core import Array, relational_loss, to_float
from jaxkd.losses.logit.dist import _weighted_pearson

__all__ = ["dist_plus_feature_terms"]


@relational_loss
def dist_plus_feature_terms(
    student_map: Array, teacher_map: Array, *, eps: float = 1e-8, example_weights: Array
) -> tuple[Array, Array]:
    """DIST+'s ``(channel, spatial)`` feature relation losses (Huang, You, Wang, Qian & Xu, "DIST+: Knowledge
    Distillation From a Stronger Adaptive Teacher", TPAMI 2025), over the batch.

    With ``[B, H, W, C]`` maps of one shape, ``N = HW`` positions and ``ρ(u, v) = Σ ū v̄ / (‖ū‖‖v̄‖ + eps)``
    (DIST's Pearson correlation, :func:`jaxkd.losses.dist`'s code):

    * channel ``= 1 − mean_{b, n} ρ(F_s[b, n, :], F_t[b, n, :])`` — at each position of each example, the
      correlation over the channels;
    * spatial ``= 1 − mean_n ρ(A_s[:, n], A_t[:, n])`` with ``A[b, n] = Σ_c F[b, n, c]`` — at each position,
      the correlation across the batch of the channel-summed maps (DIST's intra-class relation, positions
      for classes).

    DIST+ adds ``ι·channel + κ·spatial`` to DIST's logit terms (:func:`jaxkd.methods.dist_plus`).
    Follows torchdistill's ``DISTPlusLoss`` (``torchdistill/losses/mid_level.py``,
    yoshitomo-matsubara/torchdistill at 3e4373c; ``channel_relation``, ``spatial_relation``) with one
    deliberate difference: torchdistill's ``channel_relation`` returns the mean correlation itself, without
    DIST's ``1 −``, so minimizing it drives the channel profiles *apart* (anti-correlated); here it is
    ``1 − ρ`` like every other DIST relation (the same gradient magnitude, the opposite direction). The
    spatial term is torchdistill's. torchdistill's Pearson goes through ``F.cosine_similarity`` (the norms'
    product clamped at ``eps``), DIST's official code adds ``eps`` to it, as here: equal unless a profile
    is constant. No official DIST+ code was available to check against.

    With a mask, the channel mean covers the unmasked examples and the spatial correlations their
    statistics only (one unmasked example: every position is constant across the batch, spatial = 1).

    Args:
      student_map, teacher_map: ``[B, H, W, C]`` (or ``[B, N, C]``) of one shape.
      eps: ``> 0``, added to the product of the norms.
    """
    check_positive("eps", eps)
    s_shape, t_shape = np.shape(student_map), np.shape(teacher_map)
    if len(s_shape) < 3 or s_shape != t_shape:
        raise ValueError(
            f"dist_plus_feature_terms needs maps of one shape [B, H, W, C], got student {s_shape} and teacher {t_shape}"
        )
    b, c = s_shape[0], s_shape[-1]
    s, t = to_float(student_map).reshape(b, -1, c), to_float(teacher_map).reshape(b, -1, c)
    dtype = jnp.promote_types(s.dtype, t.dtype)
    s, t = s.astype(dtype), t.astype(dtype)
    w = jnp.asarray(example_weights, dtype)
    valid = w > 0
    # Masked examples may hold anything finite: zero them so they never reach a sum.
    s, t = jnp.where(valid[:, None, None], s, 0.0), jnp.where(valid[:, None, None], t, 0.0)
    count = jnp.sum(w)
    safe_count = jnp.where(count > 0, count, 1.0)

    per_position = _weighted_pearson(s, t, jnp.ones_like(s), axis=-1, eps=eps)  # [B, N]
    channel = 1.0 - jnp.sum(w * jnp.mean(per_position, axis=-1)) / safe_count

    a_s, a_t = jnp.sum(s, axis=-1), jnp.sum(t, axis=-1)  # [B, N]
    across_batch = _weighted_pearson(a_s, a_t, jnp.broadcast_to(w[:, None], a_s.shape), axis=0, eps=eps)  # [N]
    spatial = 1.0 - jnp.mean(across_batch)
    zero = jnp.zeros((), dtype)
    return jnp.where(count > 0, channel, zero), jnp.where(count > 0, spatial, zero)
