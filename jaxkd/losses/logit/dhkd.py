"""Dual-Head Knowledge Distillation (Yang, Zhang, Xie, Zhou, Xu, Zhang & Tao, "Dual-Head Knowledge
Distillation: Enhancing Logits Utilization with an Auxiliary Head", 2024): BinaryKL-Norm on an auxiliary
head, label cross-entropy on the model's own head."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxkd.checks import check_number, check_same_logits, check_temperature
from jaxkd.losses.logit.classification import cross_entropy
from jaxkd.losses.core import Array, combine_masks, is_masked, per_example_loss, to_float

__all__ = ["binary_kl_norm", "dhkd", "dhkd_terms"]


@per_example_loss
def binary_kl_norm(student_aux_logits: Array, teacher_logits: Array, *, temperature: float = 2.0, eps: float = 1e-8) -> Array:
    """BinaryKL-Norm, the logit-level loss of the auxiliary head (Yang, Zhang, Xie, Zhou, Xu, Zhang & Tao,
    "Dual-Head Knowledge Distillation: Enhancing Logits Utilization with an Auxiliary Head", 2024,
    arXiv 2411.08937).

    ``d_c = clip(σ((z_aux,c − z_t,c)/T), eps, 1 − eps)`` per class and
    ``L = T² · Σ_c KL(Bern(0.5) ‖ Bern(d_c)) = T² · Σ_c [½ log(0.5/d_c) + ½ log(0.5/(1 − d_c))]``, summed over
    classes, per example. It is 0 exactly when the logits agree class by class.

    Variant: the official ``BinaryKLNorm`` (``penghui-yang/DHKD``, ``distiller_zoo/BinaryKLNorm.py``), with
    one numerical change: the clamp is applied to the scaled logit difference (at ``±log((1 − eps)/eps)``),
    which is the same clamp of ``d`` in exact arithmetic, and ``log d``, ``log(1 − d)`` are computed with
    ``log_sigmoid`` — in float32 ``1 − 1e-8`` rounds to 1, so the official clamp lets ``log(1 − d)`` reach
    ``-inf`` once the difference exceeds about ``17·T``. As there, the gradient is 0 beyond the clamp.
    Classes excluded (``-inf``) on either side contribute 0; ``+inf`` or NaN logits give NaN (the
    official clamp would hide them). In DHKD this loss trains the *auxiliary* head
    only; the original head gets the label CE.
    """
    check_temperature("temperature", temperature)
    check_number("eps", eps, low=0.0, high=0.5, low_open=True, high_open=True)
    check_same_logits(student_aux_logits, teacher_logits)
    zs, zt = to_float(student_aux_logits), to_float(teacher_logits)
    kept = ~is_masked(zs) & ~is_masked(zt)
    diff = jnp.where(kept, zs, 0.0) - jnp.where(kept, zt, 0.0)
    diff = jnp.where(jnp.isinf(diff), jnp.nan, diff)  # +inf logits propagate instead of being clamped
    bound = math.log((1.0 - eps) / eps)
    x = jnp.clip(diff, -bound * temperature, bound * temperature) / temperature
    per_class = -math.log(2.0) - 0.5 * (jax.nn.log_sigmoid(x) + jax.nn.log_sigmoid(-x))
    return temperature**2 * jnp.sum(jnp.where(kept, per_class, 0.0), axis=-1)


def dhkd_terms(
    student_logits: Array,
    aux_logits: Array,
    teacher_logits: Array,
    labels: Array,
    *,
    temperature: float = 2.0,
    mask: Array | None = None,
    labeled: Array | None = None,
) -> tuple[Array, Array]:
    """DHKD's ``(CE(z, y), BinaryKL-Norm(z_aux, z_t; T))``, each averaged over its examples.

    The CE is averaged over the examples that are unmasked and ``labeled`` (semi-supervised batches mark
    unlabeled examples with ``labeled = False``); BinaryKL-Norm over every unmasked example.
    """
    ce = cross_entropy(student_logits, labels, mask=combine_masks(mask, labeled))
    bkl = binary_kl_norm(aux_logits, teacher_logits, temperature=temperature, mask=mask)
    return ce, bkl


def dhkd(
    student_logits: Array,
    aux_logits: Array,
    teacher_logits: Array,
    labels: Array,
    *,
    temperature: float = 2.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    mask: Array | None = None,
    labeled: Array | None = None,
) -> Array:
    """Dual-Head KD: ``ce_weight·CE(z, y) + kd_weight·BinaryKL-Norm(z_aux, z_t; T)``.

    ``z`` is the model's own head (the only one used at inference), ``z_aux`` the auxiliary head; the two
    terms are averaged over their own examples (:func:`dhkd_terms`). Official weights: 1 and 1 (CIFAR),
    1 and 0.1 (ImageNet); ``T = 2``.
    """
    ce, bkl = dhkd_terms(
        student_logits, aux_logits, teacher_logits, labels, temperature=temperature, mask=mask, labeled=labeled
    )
    return ce_weight * ce + kd_weight * bkl
