"""Named logit-level distillation objectives: DKD, logit standardization, DIST, NKD, PLD, SinKD, BD-KD,
Swing distillation and Dual-Head KD's BinaryKL-Norm.

Every function follows the conventions of :mod:`jaxkd.losses._core`: student logits first, teacher
second; computed in float32 whatever the input dtype; ``-inf`` logits are excluded classes (zero mass,
zero gradient, never NaN); per-example losses are reduced with :func:`jaxkd.losses.reduce_loss` (the mean
over unmasked examples by default; 0 when nothing is unmasked). Two losses are *batch-level* — DIST's
intra-class term and SinKD correlate or transport across the examples of the batch — and accept only
``reduction="mean"``; their ``mask`` drops examples from every batch statistic.

The gradient flows into both logits as in :func:`jaxkd.losses.kd`; the method transforms in
:mod:`jaxkd.methods.logit_methods` detach the teacher.

Where a paper and its official code disagree, each docstring says which variant is implemented. BD-KD and
Swing distillation have no public code and only their abstracts could be read; their exact rules are
documented assumptions, labelled as such.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import jax
import jax.numpy as jnp

from jaxkd.losses._core import (
    Array,
    Reduction,
    check_in_range,
    check_labels,
    check_positive,
    check_same_logits,
    finite_or_zero,
    is_concrete,
    log_softmax,
    reduce_loss,
)
from jaxkd.losses.divergences import kl_per_example

__all__ = [
    "binary_kl_norm",
    "bdkd",
    "bdkd_terms",
    "bdkd_weights",
    "dist",
    "dist_terms",
    "dkd",
    "dkd_terms",
    "ls_kd",
    "nkd",
    "nkd_terms",
    "pld",
    "sinkhorn_distance",
    "sinkhorn_plan",
    "standardize_logits",
    "swing_kd",
]

_INF = float("inf")


# ----------------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------------

def _f32(x) -> Array:
    return jnp.asarray(x, jnp.float32)


def _safe_sqrt(x: Array) -> Array:
    """``sqrt(x)`` with a zero (not infinite/NaN) gradient at ``x = 0``."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _masked_logsumexp(x: Array, where: Array, axis: int = -1, keepdims: bool = False) -> Array:
    """``log Σ_{where} exp(x)`` along ``axis``; ``-inf`` (with a zero gradient) when nothing is selected."""
    where = jnp.broadcast_to(where, x.shape)
    xm = jnp.where(where, x, -jnp.inf)
    shift = jax.lax.stop_gradient(jnp.max(xm, axis=axis, keepdims=True))
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    total = jnp.sum(jnp.where(where, jnp.exp(jnp.where(where, x - shift, 0.0)), 0.0), axis=axis, keepdims=True)
    out = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + shift, -jnp.inf)
    return out if keepdims else jnp.squeeze(out, axis=axis)


def _label_mask(labels: Array, logits: Array) -> Array:
    """Boolean one-hot ``[..., C]`` of the labels."""
    return jax.nn.one_hot(labels, jnp.shape(logits)[-1], dtype=jnp.float32) > 0


def _check_nonnegative(name: str, value) -> None:
    check_in_range(name, value, 0.0, _INF)


def _batch_reduction_only(name: str, reduction: str) -> None:
    if reduction != "mean":
        raise ValueError(
            f"{name} is a batch-level loss (it couples the examples of the batch), so only "
            f"reduction='mean' is supported, got reduction={reduction!r}"
        )


def _row_weights(leading_shape: tuple[int, ...], mask: Array | None, weights: Array | None) -> Array:
    """``mask * weights`` as float32 of the examples' shape, checked like :func:`reduce_loss` does."""
    w = jnp.ones(leading_shape, jnp.float32)
    if mask is not None:
        if jnp.shape(mask) != leading_shape:
            raise ValueError(f"mask must have shape {leading_shape}, got {jnp.shape(mask)}")
        w = w * _f32(mask)
    if weights is not None:
        if jnp.shape(weights) != leading_shape:
            raise ValueError(f"weights must have shape {leading_shape}, got {jnp.shape(weights)}")
        w = w * _f32(weights)
    return w


# ----------------------------------------------------------------------------------------------------
# 1. DKD
# ----------------------------------------------------------------------------------------------------

def _dkd_per_example(student_logits, teacher_logits, labels, temperature):
    """Per-example ``(TCKD, NCKD)``, each with its ``T²`` factor."""
    gt = _label_mask(labels, student_logits)
    log_ps = log_softmax(student_logits, temperature)
    log_pt = log_softmax(teacher_logits, temperature)

    def binary(log_p):
        # [log p_target, log Σ_{i≠target} p_i]: the second entry as a log-sum-exp over the non-target
        # log-probabilities, not log(1 − p_target), which cancels catastrophically when p_target → 1.
        log_target = jnp.sum(jnp.where(gt, log_p, 0.0), axis=-1)
        log_target = jnp.where(jnp.any(gt & jnp.isfinite(log_p), axis=-1), log_target, -jnp.inf)
        log_rest = _masked_logsumexp(log_p, (~gt) & jnp.isfinite(log_p))
        return jnp.stack([log_target, log_rest], axis=-1)

    tckd = kl_per_example(binary(log_pt), binary(log_ps))
    # Softmax over the non-target classes only: the target entry is excluded outright (mdistiller's
    # `z/T − 1000·onehot` reaches the same distribution up to e^-1000). With C = 2 a single class is left,
    # both distributions are [1] and NCKD is exactly 0 (mdistiller#60: the −1000 trick gave inf there).
    s_nt = jnp.where(gt, -jnp.inf, _f32(student_logits))
    t_nt = jnp.where(gt, -jnp.inf, _f32(teacher_logits))
    nckd = kl_per_example(t_nt, s_nt, temperature=temperature)
    scale = temperature**2
    return scale * tckd, scale * nckd


def _dkd_checks(student_logits, teacher_logits, labels, alpha, beta, temperature):
    check_positive("temperature", temperature)
    _check_nonnegative("alpha", alpha)
    _check_nonnegative("beta", beta)
    check_same_logits(student_logits, teacher_logits)
    check_labels(labels, student_logits)


def dkd_terms(
    student_logits: Array,
    teacher_logits: Array,
    labels: Array,
    *,
    temperature: float = 4.0,
    standardize: bool = False,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> tuple[Array, Array]:
    """DKD's two parts ``(TCKD, NCKD)``, each ``T²``-scaled and reduced; ``dkd = α·TCKD + β·NCKD``.

    See :func:`dkd` for the formulas and arguments.
    """
    _dkd_checks(student_logits, teacher_logits, labels, 1.0, 1.0, temperature)
    if standardize:
        student_logits, teacher_logits = standardize_logits(student_logits), standardize_logits(teacher_logits)
    tckd, nckd = _dkd_per_example(student_logits, teacher_logits, labels, temperature)
    red = lambda x: reduce_loss(x, mask=mask, weights=weights, reduction=reduction)
    return red(tckd), red(nckd)


def dkd(
    student_logits: Array,
    teacher_logits: Array,
    labels: Array,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    standardize: bool = False,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Decoupled knowledge distillation (Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation",
    CVPR 2022).

    With ``p^S = softmax(z_s/T)``, ``p^T = softmax(z_t/T)`` and target class ``y``:

    * TCKD ``= T² · KL(b^T ‖ b^S)`` on the binary split ``b = [p_y, Σ_{i≠y} p_i]`` (both parts of the full
      softmax at temperature ``T``);
    * NCKD ``= T² · KL(p̂^T ‖ p̂^S)`` with ``p̂ = softmax over the non-target classes of z/T`` (the target
      excluded, the rest renormalized);
    * ``L = α · TCKD + β · NCKD``, averaged over (unmasked) examples.

    Variant: the official code (``mdistiller/distillers/DKD.py``, ``dkd_loss``) — ``T²`` on both parts,
    batchmean, no epsilon in the student's binary log. NCKD's renormalization is computed directly (the
    target entry excluded) instead of mdistiller's ``softmax(z/T − 1000·onehot(y))``; the two agree to
    ``e^-1000``, except that for a binary task (``C = 2``) NCKD here is exactly 0 where the −1000 trick
    produced inf (mdistiller#60). The paper's ``(1 − p^T_y)`` factor on NCKD is *not* applied (the
    decomposition ``KL(p^T‖p^S) = TCKD + (1 − p^T_y)·NCKD`` is the paper's Eq. 1; DKD drops the factor).
    The warm-up ``min(epoch/warmup, 1)`` is a weight schedule of the method transform
    (:func:`jaxkd.methods.dkd`), not part of this function.

    ``standardize=True`` standardizes both logits first (:func:`standardize_logits`) and then applies DKD
    at ``T = temperature`` — DKD + logit standardization (Sun et al., CVPR 2024).

    Args:
      student_logits, teacher_logits: ``[..., C]`` of the same shape.
      labels: integer ``[...]`` in ``[0, C)``.
      alpha, beta: ``≥ 0`` weights of TCKD and NCKD (defaults: the CIFAR-100 ones, α=1, β=8).
      temperature: ``T > 0``.
      standardize: apply logit standardization to both logits first.
      mask, weights, reduction: see :func:`jaxkd.losses.reduce_loss`.
    """
    _dkd_checks(student_logits, teacher_logits, labels, alpha, beta, temperature)
    tckd, nckd = dkd_terms(
        student_logits, teacher_logits, labels, temperature=temperature, standardize=standardize,
        mask=mask, weights=weights, reduction=reduction,
    )
    return alpha * tckd + beta * nckd


# ----------------------------------------------------------------------------------------------------
# 2. Logit standardization
# ----------------------------------------------------------------------------------------------------

def standardize_logits(logits: Array, *, eps: float = 1e-7) -> Array:
    """Z-score logit standardization (Sun, Ren, Li, Wang & Cao, "Logit Standardization in Knowledge
    Distillation", CVPR 2024).

    ``Z(z) = (z − mean(z)) / (eps + std(z))`` per row over the class axis, with the **unbiased** standard
    deviation (``ddof = 1``) and ``eps`` added to the std outside the square root — exactly the official
    ``normalize`` (``sunshangquan/logit-standardization-KD``, ``mdistiller/distillers/KD.py``; torch's
    ``std`` is unbiased by default).

    Only finite entries enter the statistics; non-finite entries (``-inf`` = excluded classes) stay
    ``-inf``. A row with a single finite entry has std 0 and maps to 0 there (torch's ``ddof = 1`` would
    give NaN); a row with none stays all ``-inf``. Returns float32.
    """
    check_positive("eps", eps)
    z = _f32(logits)
    finite = jnp.isfinite(z)
    n = jnp.sum(finite, axis=-1, keepdims=True).astype(jnp.float32)
    mean = jnp.sum(jnp.where(finite, z, 0.0), axis=-1, keepdims=True) / jnp.maximum(n, 1.0)
    dev = jnp.where(finite, z - mean, 0.0)
    var = jnp.sum(dev * dev, axis=-1, keepdims=True) / jnp.maximum(n - 1.0, 1.0)
    return jnp.where(finite, dev / (eps + _safe_sqrt(var)), -jnp.inf)


def ls_kd(
    student_logits: Array,
    teacher_logits: Array,
    *,
    temperature: float = 2.0,
    eps: float = 1e-7,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """KD on standardized logits (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024).

    ``L = τ² · KL(softmax(Z(z_t)/τ) ‖ softmax(Z(z_s)/τ))`` per example (batchmean), ``Z`` as in
    :func:`standardize_logits` and ``τ`` the "base temperature" (the effective per-sample temperature is
    ``τ·std(z)``). Variant: the official ``kd_loss`` with ``logit_stand=True`` — both sides standardized,
    ``τ²`` factor; the repository's KD weight (9 on CIFAR-100) is the method's ``weight``.

    Standardization makes the loss invariant to shifting *and* (up to ``eps``) positively scaling either
    logit vector.
    """
    check_positive("temperature", temperature)
    check_same_logits(student_logits, teacher_logits)
    zs, zt = standardize_logits(student_logits, eps=eps), standardize_logits(teacher_logits, eps=eps)
    per_example = temperature**2 * kl_per_example(zt, zs, temperature=temperature)
    return reduce_loss(per_example, mask=mask, weights=weights, reduction=reduction)


# ----------------------------------------------------------------------------------------------------
# 3. DIST
# ----------------------------------------------------------------------------------------------------

def _weighted_pearson(a: Array, b: Array, w: Array, axis: int, eps: float) -> Array:
    """``Σ w·ā·b̄ / (sqrt(Σ w·ā²)·sqrt(Σ w·b̄²) + eps)`` with ``ā = a − (Σ w a / Σ w)``; 0 where ``Σ w = 0``."""
    total = jnp.sum(w, axis=axis, keepdims=True)
    safe_total = jnp.where(total > 0, total, 1.0)
    da = a - jnp.sum(w * a, axis=axis, keepdims=True) / safe_total
    db = b - jnp.sum(w * b, axis=axis, keepdims=True) / safe_total
    cov = jnp.sum(w * da * db, axis=axis)
    norm_a = _safe_sqrt(jnp.sum(w * da * da, axis=axis))
    norm_b = _safe_sqrt(jnp.sum(w * db * db, axis=axis))
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
    check_positive("temperature", temperature)
    check_positive("eps", eps)
    check_same_logits(student_logits, teacher_logits)
    shape = jnp.shape(student_logits)
    num_classes = shape[-1]
    # A class excluded (-inf) on both sides is not part of that example's vocabulary; an example with no
    # class left (an all -inf padding row) is treated as masked.
    valid = jnp.isfinite(_f32(student_logits)) | jnp.isfinite(_f32(teacher_logits))
    has_class = jnp.any(valid, axis=-1)
    if mask is None:
        mask = has_class
    elif jnp.shape(mask) == shape[:-1]:  # (a wrong shape is reported by _row_weights)
        mask = has_class & (jnp.asarray(mask) != 0)
    row_w = _row_weights(shape[:-1], mask, weights)
    valid = valid.reshape(-1, num_classes).astype(jnp.float32)
    ys = jnp.exp(log_softmax(student_logits, temperature)).reshape(-1, num_classes)
    yt = jnp.exp(log_softmax(teacher_logits, temperature)).reshape(-1, num_classes)

    # Inter-class: Pearson over the classes of each example, averaged over (unmasked) examples.
    inter_rows = 1.0 - _weighted_pearson(ys, yt, valid, axis=-1, eps=eps)
    inter = reduce_loss(inter_rows.reshape(shape[:-1]), mask=mask, weights=weights)

    # Intra-class: Pearson over the batch for each class; masked examples are dropped from the column
    # means and correlations (weight 0), soft weights weight them. Averaged over the classes present in
    # at least one unmasked example.
    w = row_w.reshape(-1, 1) * valid
    intra_cols = 1.0 - _weighted_pearson(ys, yt, w, axis=0, eps=eps)
    present = (jnp.sum(w, axis=0) > 0).astype(jnp.float32)
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
    _check_nonnegative("beta", beta)
    _check_nonnegative("gamma", gamma)
    _batch_reduction_only("dist", reduction)
    inter, intra = dist_terms(
        student_logits, teacher_logits, temperature=temperature, eps=eps, mask=mask, weights=weights
    )
    return temperature**2 * (beta * inter + gamma * intra)


# ----------------------------------------------------------------------------------------------------
# 4. NKD
# ----------------------------------------------------------------------------------------------------

def nkd_terms(
    student_logits: Array,
    teacher_logits: Array,
    labels: Array,
    *,
    temperature: float = 1.0,
    gamma: float = 1.5,
    form: Literal["ce", "kl"] = "ce",
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> tuple[Array, Array]:
    """NKD's ``(target, non-target)`` parts, reduced; the non-target part includes ``γ·λ²``. See :func:`nkd`."""
    check_positive("temperature", temperature)
    _check_nonnegative("gamma", gamma)
    if form not in ("ce", "kl"):
        raise ValueError(f"form must be 'ce' (official code) or 'kl', got form={form!r}")
    check_same_logits(student_logits, teacher_logits)
    check_labels(labels, student_logits)
    gt = _label_mask(labels, student_logits)

    log_s = log_softmax(student_logits)
    t_y = jax.lax.stop_gradient(jnp.sum(jnp.where(gt, jnp.exp(log_softmax(teacher_logits)), 0.0), axis=-1))
    target = -t_y * jnp.sum(jnp.where(gt, finite_or_zero(log_s), 0.0), axis=-1)

    s_nt = jnp.where(gt, -jnp.inf, _f32(student_logits))
    t_nt = jnp.where(gt, -jnp.inf, _f32(teacher_logits))
    log_s_hat = log_softmax(s_nt, temperature)
    log_t_hat = log_softmax(t_nt, temperature)
    t_hat = jnp.exp(log_t_hat)
    if form == "ce":
        nontarget = -jnp.sum(t_hat * finite_or_zero(log_s_hat), axis=-1)
    else:
        nontarget = jnp.sum(t_hat * (finite_or_zero(log_t_hat) - finite_or_zero(log_s_hat)), axis=-1)
    nontarget = gamma * temperature**2 * nontarget
    red = lambda x: reduce_loss(x, mask=mask, weights=weights, reduction=reduction)
    return red(target), red(nontarget)


def nkd(
    student_logits: Array,
    teacher_logits: Array,
    labels: Array,
    *,
    temperature: float = 1.0,
    gamma: float = 1.5,
    form: Literal["ce", "kl"] = "ce",
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Normalized KD (Yang, Zeng, Li, Zhang, Yuan & Li, "From Knowledge Distillation to Self-Knowledge
    Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels", ICCV 2023).

    * target part ``= −T_y · log S_y`` with ``S = softmax(z_s)``, ``T = softmax(z_t)`` at temperature 1 and
      ``T_y`` detached;
    * non-target part ``= −γ · λ² · Σ_{i≠y} T̂_i log Ŝ_i`` with ``Ŝ``, ``T̂`` the softmax at temperature
      ``λ`` over the non-target classes only (the target column deleted, the rest renormalized);
    * ``L = target + non-target``, averaged over (unmasked) examples. It is meant to be added to the usual
      label cross-entropy (``ce + nkd``).

    Variant: ``form="ce"`` (default) is the official code (``yzd-v/cls_KD``, ``mmcls/models/dis_losses/
    nkd.py``), a cross-entropy on the normalized non-target distributions. ``form="kl"`` replaces it with
    ``KL(T̂ ‖ Ŝ)``, which differs by ``γ·λ²·H(T̂)``: a constant in the student, so both forms give the same
    gradient with respect to the student logits (tested); only the reported value differs (the KL form is
    0 when the normalized non-target distributions agree). Defaults: ImageNet CNN pairs (λ=1, γ=1.5); the
    CIFAR-100 config uses λ=3, γ=3.5.
    """
    target, nontarget = nkd_terms(
        student_logits, teacher_logits, labels, temperature=temperature, gamma=gamma, form=form,
        mask=mask, weights=weights, reduction=reduction,
    )
    return target + nontarget


# ----------------------------------------------------------------------------------------------------
# 5. PLD
# ----------------------------------------------------------------------------------------------------

def pld(
    student_logits: Array,
    teacher_logits: Array,
    labels: Array,
    *,
    teacher_temperature: float = 1.0,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
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
    check_positive("teacher_temperature", teacher_temperature)
    check_same_logits(student_logits, teacher_logits)
    check_labels(labels, student_logits)
    zs, zt = _f32(student_logits), _f32(teacher_logits)
    axis = zs.ndim - 1
    gt = _label_mask(labels, zs)
    key = jnp.where(gt, jnp.inf, jnp.where(jnp.isfinite(zt), zt, -jnp.inf))
    order = jnp.argsort(-key, axis=axis, stable=True)
    s = jnp.take_along_axis(zs, order, axis=axis)
    alpha = jnp.take_along_axis(jnp.exp(log_softmax(zt, teacher_temperature)), order, axis=axis)
    valid = jnp.isfinite(s)
    # Excluded entries get a finite stand-in far below every kept logit: exp underflows to exactly 0, so
    # values and gradients are those of dropping them, and no inf − inf appears in the cumulative sum.
    floor = jax.lax.stop_gradient(jnp.min(jnp.where(valid, s, jnp.inf), axis=axis, keepdims=True))
    floor = jnp.where(jnp.isfinite(floor), floor, 0.0) - 1e4
    s_safe = jnp.where(valid, s, floor)
    suffix_lse = jax.lax.cumlogsumexp(s_safe, axis=axis, reverse=True)
    per_example = jnp.sum(jnp.where(valid, alpha * (suffix_lse - s_safe), 0.0), axis=axis)
    return reduce_loss(per_example, mask=mask, weights=weights, reduction=reduction)


# ----------------------------------------------------------------------------------------------------
# 6. SinKD
# ----------------------------------------------------------------------------------------------------

def sinkhorn_plan(
    student_logits: Array,
    teacher_logits: Array,
    *,
    temperature: float = 2.0,
    epsilon: float = 0.1,
    iterations: int = 20,
    mask: Array | None = None,
    weights: Array | None = None,
) -> tuple[Array, Array]:
    """The entropic transport plan ``P`` ``[N, N]`` and cost ``W`` ``[N, N]`` of :func:`sinkhorn_distance`.

    Leading axes are flattened to ``N`` examples. Marginals: ``a = b = w / Σ w`` with ``w = mask·weights``
    (uniform ``1/N`` by default; a masked example has zero mass, so its row and column of ``P`` are 0).
    """
    check_positive("temperature", temperature)
    check_positive("epsilon", epsilon)
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or iterations < 1:
        raise ValueError(f"iterations must be a positive int (a fixed Sinkhorn loop), got iterations={iterations!r}")
    iterations = int(iterations)
    check_same_logits(student_logits, teacher_logits)
    shape = jnp.shape(student_logits)
    num_classes = shape[-1]
    w = _row_weights(shape[:-1], mask, weights).reshape(-1)
    ps = jnp.exp(log_softmax(student_logits, temperature)).reshape(-1, num_classes)
    pt = jnp.exp(log_softmax(teacher_logits, temperature)).reshape(-1, num_classes)
    cost = jnp.sum(jnp.abs(ps[:, None, :] - pt[None, :, :]), axis=-1)  # W_ij = ‖p_s,i − p_t,j‖₁

    total = jnp.sum(w)
    marginal = jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)
    valid = marginal > 0
    log_m = jnp.log(jnp.where(valid, marginal, 1.0))
    pair = valid[:, None] & valid[None, :]
    neg_cost = -cost / epsilon

    def body(_, fg):
        f, g = fg
        # Row update, then column update (the official loop normalizes rows, then columns).
        f = jnp.where(valid, log_m - _masked_logsumexp(neg_cost + g[None, :], pair, axis=1), 0.0)
        g = jnp.where(valid, log_m - _masked_logsumexp(neg_cost + f[:, None], pair, axis=0), 0.0)
        return f, g

    zeros = jnp.zeros_like(marginal)
    f, g = jax.lax.fori_loop(0, iterations, body, (zeros, zeros))
    plan = jnp.where(pair, jnp.exp(jnp.where(pair, neg_cost + f[:, None] + g[None, :], 0.0)), 0.0)
    return plan, cost


def sinkhorn_distance(
    student_logits: Array,
    teacher_logits: Array,
    *,
    temperature: float = 2.0,
    epsilon: float = 0.1,
    iterations: int = 20,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Batch-wise Sinkhorn distance (Cui, Zhou, Zhao, Yang & Xu, "SinKD: Sinkhorn Distance Minimization for
    Knowledge Distillation", LREC-COLING 2024; extended in IEEE TNNLS).

    With ``p_s,i = softmax(z_s,i/T)`` and ``p_t,j = softmax(z_t,j/T)``, the cost between *examples* is
    ``W_ij = ‖p_s,i − p_t,j‖₁`` (``[B, B]``) and the loss is the paper's transport cost ``Σ_ij P_ij W_ij``
    of the entropic plan ``P = diag(u) exp(−W/ε) diag(v)`` after a **fixed** number of Sinkhorn iterations
    (a ``jax.lax.fori_loop``; gradients flow through every iteration, as in the official code).

    The iterations run in the log domain (potentials ``f = log u``, ``g = log v`` updated with
    log-sum-exp), so small ``ε`` does not underflow ``exp(−W/ε)``; they are algebraically the same
    row-then-column normalizations as the official loop (``2018cx/SinKD``, ``loss.py``, ``Sinkhorn``).

    Marginals: uniform ``1/B`` on both sides (``P`` is a joint distribution and the loss an average
    transport cost, comparable across batch sizes). The official code normalizes rows and columns to
    **1** instead; every iterate is then exactly ``B`` times ours, so the official value is ``B ×`` this one
    (tested). ``mask`` gives masked examples zero mass on both sides; ``weights`` make the marginals
    proportional to them.

    Variant: what the paper states. The released training script builds the Sinkhorn module but never
    adds it to the loss (FORMULAS §7), so there is no working reference combination; the official term
    weight (0.001 on GLUE) belongs in the method's ``weight``. Defaults: ``T = 2`` (hard-coded in the
    official class), ``ε = 0.1``, 20 iterations; no ``T²`` factor. Memory is ``O(B²·C)`` for the cost.
    Batch-level: only ``reduction="mean"``.
    """
    _batch_reduction_only("sinkhorn_distance", reduction)
    plan, cost = sinkhorn_plan(
        student_logits, teacher_logits, temperature=temperature, epsilon=epsilon, iterations=iterations,
        mask=mask, weights=weights,
    )
    return jnp.sum(plan * cost)


# ----------------------------------------------------------------------------------------------------
# 7. BD-KD
# ----------------------------------------------------------------------------------------------------

def _entropy(logits: Array, temperature: float) -> Array:
    log_p = log_softmax(logits, temperature)
    return -jnp.sum(jnp.exp(log_p) * finite_or_zero(log_p), axis=-1)


def bdkd_weights(student_logits: Array, teacher_logits: Array, *, temperature: float = 4.0) -> tuple[Array, Array]:
    """BD-KD's per-example ``(w_forward, w_reverse)`` (ASSUMPTION — see :func:`bdkd`), gradient-stopped.

    ``w_forward = H_t / (H_s + H_t)`` and ``w_reverse = H_s / (H_s + H_t)`` with ``H`` the entropies of
    ``softmax(z/T)``; both 0.5 when ``H_s + H_t = 0``. They sum to 1.
    """
    check_positive("temperature", temperature)
    check_same_logits(student_logits, teacher_logits)
    h_s = jax.lax.stop_gradient(_entropy(student_logits, temperature))
    h_t = jax.lax.stop_gradient(_entropy(teacher_logits, temperature))
    total = h_s + h_t
    w_forward = jnp.where(total > 0, h_t / jnp.where(total > 0, total, 1.0), 0.5)
    return w_forward, 1.0 - w_forward


def _bdkd_per_example(student_logits, teacher_logits, temperature):
    w_f, w_r = bdkd_weights(student_logits, teacher_logits, temperature=temperature)
    forward = kl_per_example(teacher_logits, student_logits, temperature=temperature)
    reverse = kl_per_example(student_logits, teacher_logits, temperature=temperature)
    scale = temperature**2
    return scale * w_f * forward, scale * w_r * reverse


def bdkd_terms(
    student_logits: Array,
    teacher_logits: Array,
    *,
    temperature: float = 4.0,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> tuple[Array, Array]:
    """BD-KD's weighted ``(T²·w_f·KL(p_t‖p_s), T²·w_r·KL(p_s‖p_t))``, reduced; their sum is :func:`bdkd`."""
    check_positive("temperature", temperature)
    forward, reverse = _bdkd_per_example(student_logits, teacher_logits, temperature)
    red = lambda x: reduce_loss(x, mask=mask, weights=weights, reduction=reduction)
    return red(forward), red(reverse)


def bdkd(
    student_logits: Array,
    teacher_logits: Array,
    *,
    temperature: float = 4.0,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Balanced-divergence KD, the student's loss (Amara, Sepahvand, Meyer, Gross & Clark, "BD-KD:
    Balancing the Divergences for Online Knowledge Distillation", 2022, arXiv 2212.12965).

    ``L = T² · [w_f · KL(p_t ‖ p_s) + w_r · KL(p_s ‖ p_t)]`` per example, ``p = softmax(z/T)``, averaged over
    (unmasked) examples, with per-example weights from :func:`bdkd_weights`:
    ``w_f = H_t/(H_s + H_t)``, ``w_r = H_s/(H_s + H_t)`` (gradient-stopped).

    From the paper's abstract: BD-KD adaptively balances forward and reverse KL with **sample-wise
    weights** at the level of the student's distillation loss, to improve the student's accuracy and
    calibration; a third-party summary of the paper (sciencestack.ai, 2212.12965) adds that the weighting
    is "guided by the entropy gap between teacher and student predictions" and that the teacher's
    objective (online setting) uses reverse KL as a regularizer. The paper's method section, any code and
    the defaults could not be read (searched: arxiv.org/html/2212.12965v2, paperswithcode, emergentmind,
    tomesphere, sciencestack, huggingface papers; no repository found).

    **The exact weighting is an assumption:** relative entropies. When the student is more confident than
    the teacher (``H_s < H_t``) the mass-covering forward KL gets more weight (it raises the student's
    entropy); when the student is less confident, the mode-seeking reverse KL does. Equal entropies give
    the symmetric ``(KL_f + KL_r)/2``. The ``T²`` factor and the default ``T = 4`` are also assumptions
    (Hinton's convention). This is the offline half (a fixed teacher); in online KD the teacher's own
    loss (CE + reverse-KL regularizer) is a separate method on the teacher.
    """
    forward, reverse = bdkd_terms(
        student_logits, teacher_logits, temperature=temperature, mask=mask, weights=weights, reduction=reduction
    )
    return forward + reverse


# ----------------------------------------------------------------------------------------------------
# 8. Swing distillation
# ----------------------------------------------------------------------------------------------------

def swing_kd(
    student_logits: Array,
    teacher_logits: Array,
    rng: Array,
    *,
    base_temperature: float = 2.0,
    max_temperature: float | None = None,
    privacy_scores: Array | None = None,
    noise_scale: float = 0.0,
    noise: Literal["gaussian", "laplace"] = "gaussian",
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Swing distillation (Li, Wu, Dong, Wu, Bian & Xiong, "Swing Distillation: A Privacy-Preserving
    Knowledge Distillation Framework", 2022, arXiv 2212.08349): KD with a per-example (per-token)
    temperature and noisy teacher soft targets.

    From the paper's text (abstract): the temperature is set per token, adaptively, from the likelihood
    that the token carries private information; noise is injected into the soft targets given to the
    student. The method section and code could not be read (searched: ar5iv 2212.08349, arxiv abs,
    deepai, emergentmind, arxivlens; no repository found). **The following are assumptions:**

    * the privacy likelihood is an input, ``privacy_scores ∈ [0, 1]`` per example (from a private-entity
      detector the user runs; the paper's detector is not reproduced), and it maps *linearly* to the
      temperature ``T_i = base + (max − base) · r_i`` (``max_temperature`` defaults to ``base``: constant);
      a higher temperature flattens the teacher's targets on likely-private tokens;
    * the noise is added to the tempered teacher logits, ``q_i = softmax(z_t,i/T_i + σ·ξ_i)``, with
      ``ξ ~ N(0, I)`` (``noise="gaussian"``) or Laplace(0, 1) (``noise="laplace"``, scale ``σ``), drawn
      independently per example and class from ``rng`` — adding it in log space keeps ``q`` a distribution;
      excluded (``-inf``) classes get no noise and stay at zero mass. No privacy accounting is done;
    * ``L = T_i² · KL(q_i ‖ softmax(z_s,i/T_i))`` per example, averaged over (unmasked) examples.

    With ``noise_scale = 0`` and a constant temperature this is exactly :func:`jaxkd.losses.kd`. All
    randomness comes from ``rng`` (a fixed key gives a fixed value).
    """
    check_positive("base_temperature", base_temperature)
    if max_temperature is None:
        max_temperature = base_temperature
    check_positive("max_temperature", max_temperature)
    _check_nonnegative("noise_scale", noise_scale)
    if noise not in ("gaussian", "laplace"):
        raise ValueError(f"noise must be 'gaussian' or 'laplace', got noise={noise!r}")
    check_same_logits(student_logits, teacher_logits)
    shape = jnp.shape(student_logits)
    if privacy_scores is None:
        temperature = jnp.full(shape[:-1], base_temperature, jnp.float32)
    else:
        if jnp.shape(privacy_scores) != shape[:-1]:
            raise ValueError(
                f"privacy_scores must have the examples' shape logits.shape[:-1]={shape[:-1]}, "
                f"got {jnp.shape(privacy_scores)}"
            )
        r = _f32(privacy_scores)
        if is_concrete(r) and jnp.size(r) and not (float(jnp.min(r)) >= 0.0 and float(jnp.max(r)) <= 1.0):
            raise ValueError(
                f"privacy_scores must lie in [0, 1], got values in [{float(jnp.min(r))}, {float(jnp.max(r))}]"
            )
        temperature = base_temperature + (max_temperature - base_temperature) * r
    t_col = temperature[..., None]
    zt = _f32(teacher_logits) / t_col
    finite = jnp.isfinite(zt)
    if noise == "gaussian":
        xi = jax.random.normal(rng, shape, jnp.float32)
    else:
        xi = jax.random.laplace(rng, shape, jnp.float32)
    noisy = jnp.where(finite, zt + noise_scale * xi, -jnp.inf)
    log_q = log_softmax(noisy)
    log_p = log_softmax(_f32(student_logits) / t_col)
    kl = jnp.sum(jnp.exp(log_q) * (finite_or_zero(log_q) - finite_or_zero(log_p)), axis=-1)
    return reduce_loss(temperature**2 * kl, mask=mask, weights=weights, reduction=reduction)


# ----------------------------------------------------------------------------------------------------
# 9. Dual-Head KD: BinaryKL-Norm
# ----------------------------------------------------------------------------------------------------

def binary_kl_norm(
    student_aux_logits: Array,
    teacher_logits: Array,
    *,
    temperature: float = 2.0,
    eps: float = 1e-8,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """BinaryKL-Norm, the logit-level loss of the auxiliary head (Yang, Zhang, Xie, Zhou, Xu, Zhang & Tao,
    "Dual-Head Knowledge Distillation: Enhancing Logits Utilization with an Auxiliary Head", 2024,
    arXiv 2411.08937).

    ``d_c = clip(σ((z_aux,c − z_t,c)/T), eps, 1 − eps)`` per class and
    ``L = T² · Σ_c KL(Bern(0.5) ‖ Bern(d_c)) = T² · Σ_c [½ log(0.5/d_c) + ½ log(0.5/(1 − d_c))]``, summed over
    classes and averaged over (unmasked) examples. It is 0 exactly when the logits agree class by class.

    Variant: the official ``BinaryKLNorm`` (``penghui-yang/DHKD``, ``distiller_zoo/BinaryKLNorm.py``), with
    one numerical change: the clamp is applied to the scaled logit difference (at ``±log((1 − eps)/eps)``),
    which is the same clamp of ``d`` in exact arithmetic, and ``log d``, ``log(1 − d)`` are computed with
    ``log_sigmoid`` — in float32 ``1 − 1e-8`` rounds to 1, so the official clamp lets ``log(1 − d)`` reach
    ``-inf`` once the difference exceeds about ``17·T``. As there, the gradient is 0 beyond the clamp.
    Classes excluded (``-inf``) on either side contribute 0. In DHKD this loss trains the *auxiliary* head
    only; the original head gets the label CE.
    """
    check_positive("temperature", temperature)
    check_in_range("eps", eps, 0.0, 0.5)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got eps={eps!r}")
    check_same_logits(student_aux_logits, teacher_logits)
    zs, zt = _f32(student_aux_logits), _f32(teacher_logits)
    valid = jnp.isfinite(zs) & jnp.isfinite(zt)
    bound = math.log((1.0 - eps) / eps)
    x = jnp.clip(jnp.where(valid, zs, 0.0) - jnp.where(valid, zt, 0.0), -bound * temperature, bound * temperature)
    x = x / temperature
    per_class = -math.log(2.0) - 0.5 * (jax.nn.log_sigmoid(x) + jax.nn.log_sigmoid(-x))
    per_example = temperature**2 * jnp.sum(jnp.where(valid, per_class, 0.0), axis=-1)
    return reduce_loss(per_example, mask=mask, weights=weights, reduction=reduction)
