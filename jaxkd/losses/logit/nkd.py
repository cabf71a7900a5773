"""Normalized KD (Yang, Zeng, Li, Zhang, Yuan & Li, "From Knowledge Distillation to Self-Knowledge
Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels", ICCV 2023)."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from jaxkd.checks import check_choice, check_labels, check_nonnegative, check_same_logits, check_temperature
from jaxkd.losses.core import Array, label_one_hot, log_softmax, per_example_loss, probs, zero_where_masked

__all__ = ["nkd", "nkd_terms"]


@per_example_loss
def nkd_terms(
    student_logits: Array,
    teacher_logits: Array,
    labels: Array,
    *,
    temperature: float = 1.0,
    gamma: float = 1.5,
    form: Literal["ce", "kl"] = "ce",
) -> tuple[Array, Array]:
    """NKD's ``(target, non-target)`` parts; the non-target part includes ``γ·λ²``. See :func:`nkd`."""
    check_temperature("temperature", temperature)
    check_nonnegative("gamma", gamma)
    check_choice("form", form, ("ce", "kl"))
    check_same_logits(student_logits, teacher_logits)
    check_labels(labels, student_logits)
    log_s, log_t = log_softmax(student_logits), log_softmax(teacher_logits)
    gt, valid = label_one_hot(labels, log_s.shape[-1])

    # The teacher's target probability is a weight, detached as in the official code.
    t_y = jax.lax.stop_gradient(jnp.sum(jnp.where(gt, probs(log_t), 0.0), axis=-1))
    target = -t_y * jnp.sum(jnp.where(gt, zero_where_masked(log_s), 0.0), axis=-1)

    # Non-target distributions: the target column deleted, the rest renormalized at temperature λ.
    log_s_hat = log_softmax(jnp.where(gt, -jnp.inf, log_s), temperature)
    log_t_hat = log_softmax(jnp.where(gt, -jnp.inf, log_t), temperature)
    t_hat = probs(log_t_hat)
    if form == "ce":
        nontarget = -jnp.sum(t_hat * zero_where_masked(log_s_hat), axis=-1)
    else:
        nontarget = jnp.sum(t_hat * (zero_where_masked(log_t_hat) - zero_where_masked(log_s_hat)), axis=-1)
    nontarget = gamma * temperature**2 * nontarget
    return jnp.where(valid, target, jnp.nan), jnp.where(valid, nontarget, jnp.nan)


@per_example_loss
def nkd(
    student_logits: Array,
    teacher_logits: Array,
    labels: Array,
    *,
    temperature: float = 1.0,
    gamma: float = 1.5,
    form: Literal["ce", "kl"] = "ce",
) -> Array:
    """Normalized KD (Yang, Zeng, Li, Zhang, Yuan & Li, "From Knowledge Distillation to Self-Knowledge
    Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels", ICCV 2023).

    * target part ``= −T_y · log S_y`` with ``S = softmax(z_s)``, ``T = softmax(z_t)`` at temperature 1 and
      ``T_y`` detached;
    * non-target part ``= −γ · λ² · Σ_{i≠y} T̂_i log Ŝ_i`` with ``Ŝ``, ``T̂`` the softmax at temperature
      ``λ`` over the non-target classes only (the target column deleted, the rest renormalized);
    * ``L = target + non-target`` per example. It is meant to be added to the usual
      label cross-entropy (``ce + nkd``).

    Variant: ``form="ce"`` (default) is the official code (``yzd-v/cls_KD``, ``mmcls/models/dis_losses/
    nkd.py``), a cross-entropy on the normalized non-target distributions. ``form="kl"`` replaces it with
    ``KL(T̂ ‖ Ŝ)``, which differs by ``γ·λ²·H(T̂)``: a constant in the student, so both forms give the same
    gradient with respect to the student logits (tested); only the reported value differs (the KL form is
    0 when the normalized non-target distributions agree). Defaults: ImageNet CNN pairs (λ=1, γ=1.5); the
    CIFAR-100 config uses λ=3, γ=3.5.
    """
    target, nontarget = nkd_terms(
        student_logits, teacher_logits, labels, temperature=temperature, gamma=gamma, form=form, reduction="none"
    )
    return target + nontarget
