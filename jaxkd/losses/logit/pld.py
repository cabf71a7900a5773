"""Plackett-Luce distillation (Bassam, Zhu & Bian, "PLD: A Choice-Theoretic List-Wise Knowledge
Distillation", 2025)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd.checks import check_labels, check_same_logits, check_temperature
from jaxkd.losses.core import Array, is_masked, label_one_hot, log_softmax, per_example_loss, probs, to_float

__all__ = ["pld"]


@per_example_loss
def pld(student_logits: Array, teacher_logits: Array, labels: Array, *, teacher_temperature: float = 1.0) -> Array:
    """Plackett-Luce distillation (Bassam, Zhu & Bian, "PLD: A Choice-Theoretic List-Wise Knowledge
    Distillation", 2025, arXiv 2506.12542).

    The teacher-optimal permutation ``π*`` puts the true label first, then the other classes by descending
    teacher logit. With ``s`` the (un-tempered) student logits and ``α_k = softmax(z_t/τ_T)[π*_k]``:

        ``L = Σ_k α_k [log Σ_{ℓ≥k} exp(s_{π*_ℓ}) − s_{π*_k}]``

    — a confidence-weighted sum of the Plackett-Luce negative log-likelihoods of each choice in ``π*``.
    PLD *replaces* CE + KD (no separate label term). ``O(C log C)``: one argsort and one reverse
    cumulative log-sum-exp (``jax.lax.cumlogsumexp``).

    Variant: the paper's Appendix C code (``create_adjusted_ranking`` + ``plackett_luce_loss``), the only
    reference implementation: weights not renormalized, student not temperature-scaled, the last position
    contributing 0. Ties in the teacher logits are broken by class index. Classes the student excludes
    (``-inf``) are dropped from every term; classes only the teacher excludes get ``α = 0`` and rank last.
    The paper finds ``τ_T = 1`` best on ImageNet.
    """
    check_temperature("teacher_temperature", teacher_temperature)
    check_same_logits(student_logits, teacher_logits)
    check_labels(labels, student_logits)
    zs, zt = to_float(student_logits), to_float(teacher_logits)
    axis = zs.ndim - 1
    gt, valid_label = label_one_hot(labels, zs.shape[-1])
    key = jnp.where(gt, jnp.inf, zt)
    order = jnp.argsort(-key, axis=axis, stable=True)
    s = jnp.take_along_axis(zs, order, axis=axis)
    alpha = jnp.take_along_axis(probs(log_softmax(zt, teacher_temperature)), order, axis=axis)
    kept = ~is_masked(s)
    # Excluded entries get a finite stand-in far below every kept logit: exp underflows to exactly 0, so
    # values and gradients are those of dropping them, and no inf − inf appears in the cumulative sum.
    floor = jax.lax.stop_gradient(jnp.min(jnp.where(kept, s, jnp.inf), axis=axis, keepdims=True))
    floor = jnp.where(jnp.isfinite(floor), floor, 0.0) - 1e4
    s_safe = jnp.where(kept, s, floor)
    suffix_lse = jax.lax.cumlogsumexp(s_safe, axis=axis, reverse=True)
    per_example = jnp.sum(jnp.where(kept, alpha * (suffix_lse - s_safe), 0.0), axis=axis)
    return jnp.where(valid_label, per_example, jnp.nan)
