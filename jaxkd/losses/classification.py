"""Label cross-entropy and Hinton's knowledge distillation over class logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd.losses._core import (
    Array,
    Reduction,
    check_in_range,
    check_labels,
    check_positive,
    finite_or_zero,
    log_softmax,
    reduce_loss,
)
from jaxkd.losses.divergences import kl_per_example


def cross_entropy(
    logits: Array,
    labels: Array,
    *,
    label_smoothing: float = 0.0,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Cross-entropy with integer labels and optional label smoothing.

    ``ℓ = −Σ_c y_c log softmax(z)_c`` with ``y = (1 − ε)·onehot(label) + ε/C`` (Szegedy et al.,
    "Rethinking the Inception Architecture for Computer Vision", 2016, for the smoothing).
    Classes masked with ``-inf`` logits are left out of the sum. Labels are checked to lie in
    ``[0, C)`` whenever they are concrete (outside ``jit``); inside ``jit`` the train step checks them
    on the host before dispatch.

    Args:
      logits: ``[..., C]`` (any float dtype; computed in float32).
      labels: integer ``[...]``.
      label_smoothing: ``ε`` in ``[0, 1]``.
      mask, weights, reduction: see :func:`jaxkd.losses.reduce_loss`.
    """
    check_in_range("label_smoothing", label_smoothing, 0.0, 1.0)
    check_labels(labels, logits)
    num_classes = jnp.shape(logits)[-1]
    log_q = finite_or_zero(log_softmax(logits))
    target = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing:
        target = (1.0 - label_smoothing) * target + label_smoothing / num_classes
    per_example = -jnp.sum(target * log_q, axis=-1)
    return reduce_loss(per_example, mask=mask, weights=weights, reduction=reduction)


def kd(
    student_logits: Array,
    teacher_logits: Array,
    *,
    temperature: float = 4.0,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Knowledge distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015).

    ``L = T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))`` per example, averaged over (unmasked) examples —
    PyTorch's ``batchmean``, the form RepDistiller and mdistiller use. The ``T²`` factor keeps gradient
    magnitudes comparable across temperatures, since ``∂L/∂z_s → (z_s − z_t)/C`` (zero-mean logits) as
    ``T → ∞``.

    The gradient flows into both logits; the train step already detaches the teacher.

    Args:
      student_logits, teacher_logits: ``[..., C]`` of the same shape.
      temperature: ``T > 0``.
      mask, weights, reduction: see :func:`jaxkd.losses.reduce_loss`.
    """
    check_positive("temperature", temperature)
    per_example = kl_per_example(teacher_logits, student_logits, temperature=temperature)
    return reduce_loss(temperature**2 * per_example, mask=mask, weights=weights, reduction=reduction)
