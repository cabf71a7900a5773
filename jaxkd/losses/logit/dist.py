"""DIST (Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022)."""

from __future__ import annotations

import jax.numpy as jnp

from jaxkd.checks import check_nonnegative, check_positive, check_same_logits, check_temperature
from jaxkd.losses.core import (
    Array,
    Reduction,
    check_batch_reduction,
    example_weights,
    is_masked,
    log_softmax,
    probs,
    reduce_loss,
    safe_sqrt,
)

__all__ = ["dist", "dist_terms"]


def _weighted_pearson(a: Array, b: Array, w: Array, axis: int, eps: float) -> Array:
    """``Σ w·ā·b̄ / (sqrt(Σ w·ā²)·sqrt(Σ w·b̄²) + eps)`` with ``ā = a − (Σ w a / Σ w)``; 0 where ``Σ w = 0``."""
    total = jnp.sum(w, axis=axis, keepdims=True)
    safe_total = jnp.where(total > 0, total, 1.0)
    da = a - jnp.sum(w * a, axis=axis, keepdims=True) / safe_total
    db = b - jnp.sum(w * b, axis=axis, keepdims=True) / safe_total
    cov = jnp.sum(w * da * db, axis=axis)
    norm_a = safe_sqrt(jnp.sum(w * da * da, axis=axis))
    norm_b = safe_sqrt(jnp.sum(w * db * db, axis=axis))
    return cov / (norm_a * norm_b + eps)


def dist_terms(
    student_logits: Array,
    teacher_logits: Array,
    *,
    temperature: float = 1.0,
    eps: float = 1e-8,
    mask: Array | None = None,
    weights: Array | None = None,
) -> tuple[Array, Array]:
    """DIST's ``(inter, intra)`` correlation losses, without ``β``, ``γ`` or ``τ²``. See :func:`dist`."""
    check_temperature("temperature", temperature)
    check_positive("eps", eps)
    check_same_logits(student_logits, teacher_logits)
    shape = jnp.shape(student_logits)
    num_classes = shape[-1]
    log_ys, log_yt = log_softmax(student_logits, temperature), log_softmax(teacher_logits, temperature)
    # A class excluded (-inf) on both sides is not part of that example's vocabulary; an example with no
    # class left (an all -inf padding row) is treated as masked.
    kept = ~is_masked(log_ys) | ~is_masked(log_yt)
    has_class = jnp.any(kept, axis=-1)
    row_w = example_weights(shape[:-1], mask, weights, log_ys.dtype) * has_class
    kept = kept.reshape(-1, num_classes).astype(log_ys.dtype)
    ys, yt = probs(log_ys).reshape(-1, num_classes), probs(log_yt).reshape(-1, num_classes)

    # Inter-class: Pearson over the classes of each example, averaged over (unmasked) examples.
    inter_rows = 1.0 - _weighted_pearson(ys, yt, kept, axis=-1, eps=eps)
    inter = reduce_loss(inter_rows.reshape(shape[:-1]), weights=row_w)

    # Intra-class: Pearson over the batch for each class; masked examples are dropped from the column
    # means and correlations (weight 0), soft weights weight them. Averaged over the classes present in
    # at least one unmasked example.
    w = row_w.reshape(-1, 1) * kept
    intra_cols = 1.0 - _weighted_pearson(ys, yt, w, axis=0, eps=eps)
    present = (jnp.sum(w, axis=0) > 0).astype(ys.dtype)
    count = jnp.sum(present)
    intra = jnp.where(count > 0, jnp.sum(present * intra_cols) / jnp.where(count > 0, count, 1.0), 0.0)
    return inter, intra


def dist(
    student_logits: Array,
    teacher_logits: Array,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    eps: float = 1e-8,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """DIST (Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022).

    With probabilities ``Y_s = softmax(z_s/τ)``, ``Y_t = softmax(z_t/τ)`` (``[N, C]``, leading axes
    flattened) and ``ρ(u, v) = Σ ū v̄ / (‖ū‖‖v̄‖ + eps)`` (``ū = u − mean(u)``, ``eps`` added to the
    product of the norms):

    * inter-class ``= 1 − mean_n ρ(Y_s[n, :], Y_t[n, :])`` (per example, over the classes);
    * intra-class ``= 1 − mean_c ρ(Y_s[:, c], Y_t[:, c])`` (per class, across the batch);
    * ``L = τ² · (β · inter + γ · intra)``.

    Variant: the official ``DIST`` class (``hunto/image_classification_sota``,
    ``lib/models/losses/dist_kd.py``) — Pearson on probabilities, ``τ²``, the same ``eps`` placement.
    Masking (not in the official code): masked examples are left out of the inter-class mean and of the
    intra-class column statistics (means, norms and correlations), so padding never changes the loss;
    ``weights`` weight both. A class that is ``-inf`` on both sides is left out of that example's
    statistics (inter and intra); an example with no class left counts as masked. With a single unmasked
    example every column is constant and the intra-class term is 1, as in the official code with a batch
    of one (likewise a constant row or column has correlation 0: equal inputs give 0 only when every row
    and column varies).

    Batch-level: only ``reduction="mean"``. The official configs use ``β = γ = 2`` (``kd_loss_weight``)
    and ``τ = 4`` on CIFAR-100, ``τ = 1`` on ImageNet.
    """
    check_nonnegative("beta", beta)
    check_nonnegative("gamma", gamma)
    check_batch_reduction("dist", reduction)
    inter, intra = dist_terms(
        student_logits, teacher_logits, temperature=temperature, eps=eps, mask=mask, weights=weights
    )
    return temperature**2 * (beta * inter + gamma * intra)
