"""Label cross-entropy and Hinton's knowledge distillation over class logits."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_in_range, check_labels, check_temperature, is_concrete
from jaxkd.losses.core import Array, is_masked, label_one_hot, log_softmax, per_example_loss
from jaxkd.losses.logit.divergences import forward_kl
from jaxkd.losses.logit.kl_kernels import cross_entropy_rows

__all__ = ["cross_entropy", "kd"]


def _check_labels_not_masked(logits: Array, labels: Array) -> None:
    """A label whose class is ``-inf`` (excluded) is a data bug: refuse it where the values are known."""
    if not (is_concrete(logits) and is_concrete(labels)) or not np.size(labels):
        return
    values = np.asarray(labels)
    picked = np.take_along_axis(np.asarray(logits, np.float32), values[..., None], axis=-1)[..., 0]
    if np.any(picked == -np.inf):
        first = tuple(int(i) for i in np.argwhere(picked == -np.inf)[0])
        raise ValueError(
            f"label {int(values[first])} at index {first} is a class whose logit is -inf (excluded): "
            "the example's cross-entropy is infinite"
        )


@per_example_loss
def cross_entropy(logits: Array, labels: Array, *, label_smoothing: float = 0.0) -> Array:
    """Cross-entropy with integer labels and optional label smoothing, per example.

    ``ℓ = −Σ_c y_c log softmax(z)_c`` with ``y = (1 − ε)·onehot(label) + ε·u`` where ``u`` is uniform over
    the classes that are not excluded (``-inf``) — Szegedy et al., "Rethinking the Inception Architecture
    for Computer Vision" (2016), for the smoothing; without excluded classes ``u = 1/C`` as there.

    A label pointing at an excluded (``-inf``) class is a data bug: the value is ``+inf`` (inside ``jit``)
    or a ``ValueError`` (when logits and labels are concrete), never a silent 0. A label outside
    ``[0, C)`` raises when concrete and gives NaN for that example inside ``jit``.

    Args:
      logits: ``[..., C]``.
      labels: integer ``[...]``.
      label_smoothing: ``ε`` in ``[0, 1]``.
    """
    check_in_range("label_smoothing", label_smoothing, 0.0, 1.0)
    check_labels(labels, logits)
    _check_labels_not_masked(logits, labels)
    if is_concrete(label_smoothing):  # the hand-differentiated kernel (jaxkd.losses.logit.kl_kernels)
        return cross_entropy_rows(logits, labels, float(label_smoothing))
    log_q = log_softmax(logits)
    one_hot, valid = label_one_hot(labels, log_q.shape[-1])
    target = one_hot.astype(log_q.dtype)
    if label_smoothing:
        kept = (~is_masked(log_q)).astype(log_q.dtype)
        uniform = kept / jnp.maximum(jnp.sum(kept, axis=-1, keepdims=True), 1.0)
        target = (1.0 - label_smoothing) * target + label_smoothing * uniform
    # Only classes with target mass enter the sum: 0·log 0 stays 0, while a labelled class at -inf
    # gives +inf (see above).
    per_example = -jnp.sum(jnp.where(target > 0, target * log_q, 0.0), axis=-1)
    return jnp.where(valid, per_example, jnp.nan)


@per_example_loss
def kd(student_logits: Array, teacher_logits: Array, *, temperature: float = 4.0) -> Array:
    """Knowledge distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015).

    ``L = T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))`` per example; the default mean over examples is
    PyTorch's ``batchmean``, the form RepDistiller and mdistiller use. The ``T²`` factor keeps gradient
    magnitudes comparable across temperatures, since ``∂L/∂z_s → (z_s − z_t)/C`` (zero-mean logits) as
    ``T → ∞``.

    Args:
      student_logits, teacher_logits: ``[..., C]`` of the same shape.
      temperature: ``T`` in :data:`jaxkd.checks.TEMPERATURE_RANGE`.
    """
    check_temperature("temperature", temperature)
    return temperature**2 * forward_kl(student_logits, teacher_logits, temperature=temperature, reduction="none")
