"""Dual-Head Optimization (Kang et al., "Simple yet Effective Semi-supervised Knowledge Distillation from
Vision-Language Models via Dual-Head Optimization", 2025): label CE on the model's head, KD on a second
head, the two heads' predictions mixed at inference."""

from __future__ import annotations

import jax.numpy as jnp

from jaxkd.checks import check_in_range, check_temperature
from jaxkd.losses.logit.classification import cross_entropy, kd
from jaxkd.losses.core import Array, combine_masks, log_mixture, log_softmax

__all__ = ["dho", "dho_log_probs", "dho_terms"]


def dho_terms(
    student_logits: Array,
    kd_head_logits: Array,
    teacher_logits: Array,
    labels: Array,
    *,
    temperature: float = 2.0,
    mask: Array | None = None,
    labeled: Array | None = None,
) -> tuple[Array, Array]:
    """DHO's ``(CE(z_ce, y), T²·KL(softmax(z_t/T) ‖ softmax(z_kd/T)))``, each averaged over its examples.

    The semi-supervised setting of the paper: the CE is averaged over the unmasked examples that are
    ``labeled``, the KD term over every unmasked example (labeled or not).
    """
    ce = cross_entropy(student_logits, labels, mask=combine_masks(mask, labeled))
    distill = kd(kd_head_logits, teacher_logits, temperature=temperature, mask=mask)
    return ce, distill


def dho(
    student_logits: Array,
    kd_head_logits: Array,
    teacher_logits: Array,
    labels: Array,
    *,
    temperature: float = 2.0,
    ce_weight: float = 0.5,
    kd_weight: float = 0.5,
    mask: Array | None = None,
    labeled: Array | None = None,
) -> Array:
    """DHO's training loss ``ce_weight·CE(z_ce, y) + kd_weight·T²·KL(softmax(z_t/T) ‖ softmax(z_kd/T))``.

    ``z_ce`` is the model's own head, trained on labels only; ``z_kd`` a second head on the same
    features, trained by the teacher only. Each term is averaged over its own examples
    (:func:`dho_terms`): labeled ones for the CE, all of them for the KD term. Official weights 0.5/0.5
    (``train_others.py`` of the official code).
    """
    ce, distill = dho_terms(
        student_logits, kd_head_logits, teacher_logits, labels, temperature=temperature, mask=mask, labeled=labeled
    )
    return ce_weight * ce + kd_weight * distill


def dho_log_probs(
    student_logits: Array, kd_head_logits: Array, *, mix: float = 0.5, kd_head_temperature: float = 1.0
) -> Array:
    """DHO's inference: ``log(mix·softmax(z_ce) + (1 − mix)·softmax(z_kd / kd_head_temperature))``.

    The official code grid-searches ``mix`` ∈ {0, 0.05, …, 1} and the head temperature ∈ {0.5 … 4} on
    validation data.
    """
    check_in_range("mix", mix, 0.0, 1.0)
    check_temperature("kd_head_temperature", kd_head_temperature)
    return log_mixture(log_softmax(student_logits), log_softmax(kd_head_logits, kd_head_temperature), mix)
