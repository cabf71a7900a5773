"""Decoupled knowledge distillation (Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation",
CVPR 2022)."""

from __future__ import annotations

import jax.numpy as jnp

from jaxkd.checks import check_labels, check_nonnegative, check_same_logits, check_temperature
from jaxkd.losses.core import (
    Array,
    is_masked,
    kl_from_log_probs,
    label_one_hot,
    log_softmax,
    masked_logsumexp,
    per_example_loss,
)
from jaxkd.losses.logit.kd_ls import standardize_logits

__all__ = ["dkd", "dkd_terms"]


def _binary_log_probs(log_p: Array, target: Array) -> Array:
    """``[log p_y, log Σ_{i≠y} p_i]`` — the second entry as a log-sum-exp over the non-target entries,
    not ``log(1 − p_y)``, which cancels catastrophically when ``p_y → 1``."""
    log_target = jnp.sum(jnp.where(target, log_p, 0.0), axis=-1)
    log_target = jnp.where(jnp.any(target & ~is_masked(log_p), axis=-1), log_target, -jnp.inf)
    return jnp.stack([log_target, masked_logsumexp(log_p, ~target)], axis=-1)


@per_example_loss
def dkd_terms(
    student_logits: Array,
    teacher_logits: Array,
    labels: Array,
    *,
    temperature: float = 4.0,
    standardize: bool = False,
) -> tuple[Array, Array]:
    """DKD's two parts ``(TCKD, NCKD)``, each ``T²``-scaled; :func:`dkd` is ``α·TCKD + β·NCKD``.

    See :func:`dkd` for the formulas and arguments.
    """
    check_temperature("temperature", temperature)
    check_same_logits(student_logits, teacher_logits)
    check_labels(labels, student_logits)
    if standardize:
        student_logits, teacher_logits = standardize_logits(student_logits), standardize_logits(teacher_logits)
    log_ps = log_softmax(student_logits, temperature)
    log_pt = log_softmax(teacher_logits, temperature)
    target, valid = label_one_hot(labels, log_ps.shape[-1])
    tckd = kl_from_log_probs(_binary_log_probs(log_pt, target), _binary_log_probs(log_ps, target))
    # Softmax over the non-target classes only: the target entry is excluded outright (mdistiller's
    # `z/T − 1000·onehot` reaches the same distribution up to e^-1000). With C = 2 a single class is left,
    # both distributions are [1] and NCKD is exactly 0 (mdistiller#60: the −1000 trick gave inf there).
    nckd = kl_from_log_probs(log_softmax(jnp.where(target, -jnp.inf, log_pt)),
                             log_softmax(jnp.where(target, -jnp.inf, log_ps)))
    scale = temperature**2
    return jnp.where(valid, scale * tckd, jnp.nan), jnp.where(valid, scale * nckd, jnp.nan)


@per_example_loss
def dkd(
    student_logits: Array,
    teacher_logits: Array,
    labels: Array,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    standardize: bool = False,
) -> Array:
    """Decoupled knowledge distillation (Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation",
    CVPR 2022), per example.

    With ``p^S = softmax(z_s/T)``, ``p^T = softmax(z_t/T)`` and target class ``y``:

    * TCKD ``= T² · KL(b^T ‖ b^S)`` on the binary split ``b = [p_y, Σ_{i≠y} p_i]`` (both parts of the full
      softmax at temperature ``T``);
    * NCKD ``= T² · KL(p̂^T ‖ p̂^S)`` with ``p̂ = softmax over the non-target classes of z/T`` (the target
      excluded, the rest renormalized);
    * ``L = α · TCKD + β · NCKD``.

    Variant: the official code (``megvii-research/mdistiller``, ``mdistiller/distillers/DKD.py``,
    ``dkd_loss``) — ``T²`` on both parts, batchmean, no epsilon in the student's binary log. NCKD's
    renormalization is computed directly (the target entry excluded) instead of mdistiller's
    ``softmax(z/T − 1000·onehot(y))``; the two agree to ``e^-1000``, except that for a binary task
    (``C = 2``) NCKD here is exactly 0 where the −1000 trick produced inf (mdistiller#60). The paper's
    ``(1 − p^T_y)`` factor on NCKD is *not* applied (the decomposition ``KL(p^T‖p^S) = TCKD + (1 −
    p^T_y)·NCKD`` is the paper's Eq. 1; DKD drops the factor). The warm-up ``min(epoch/warmup, 1)`` is a
    weight schedule of the method transform (:func:`jaxkd.methods.dkd`), not part of this function.

    ``standardize=True`` standardizes both logits first (:func:`jaxkd.losses.standardize_logits`) and then
    applies DKD at ``T = temperature`` — DKD + logit standardization (Sun et al., CVPR 2024).

    Args:
      student_logits, teacher_logits: ``[..., C]`` of the same shape.
      labels: integer ``[...]`` in ``[0, C)``.
      alpha, beta: ``≥ 0`` weights of TCKD and NCKD (defaults: the CIFAR-100 ones, α=1, β=8).
      temperature: ``T`` in :data:`jaxkd.checks.TEMPERATURE_RANGE`.
      standardize: apply logit standardization to both logits first.
    """
    check_nonnegative("alpha", alpha)
    check_nonnegative("beta", beta)
    tckd, nckd = dkd_terms(
        student_logits, teacher_logits, labels, temperature=temperature, standardize=standardize, reduction="none"
    )
    return alpha * tckd + beta * nckd
