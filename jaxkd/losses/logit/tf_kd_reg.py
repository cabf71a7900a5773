"""Teacher-free KD with a manually designed "virtual teacher" (Tf-KD_reg: Yuan, Tay, Li, Wang & Feng,
"Revisiting Knowledge Distillation via Label Smoothing Regularization", CVPR 2020).

Checked against the official code (``yuanli2333/Teacher-free-Knowledge-Distillation``, ``my_loss_function.py``:
``loss_kd_regularization``, commit 880a74e).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_in_range, check_labels, check_temperature
from jaxkd.losses.core import Array, is_masked, kl_from_log_probs, log_softmax, per_example_loss, to_float

__all__ = ["tf_kd_virtual_teacher", "virtual_teacher_probs"]


def virtual_teacher_probs(logits: Array, labels: Array, *, correct_prob: float = 0.99) -> Array:
    """Tf-KD_reg's virtual teacher ``p^d``: ``a`` on the label, ``(1 − a)/(K − 1)`` on each other class.

    ``K`` counts the classes of ``logits`` that are not excluded (``-inf``); excluded classes get 0. Shapes
    ``[..., C]`` and ``[...]``.
    """
    z = to_float(logits)
    kept = ~is_masked(z)
    k = jnp.sum(kept, axis=-1, keepdims=True).astype(z.dtype)
    is_label = jnp.arange(z.shape[-1]) == jnp.asarray(labels)[..., None]
    rest = (1.0 - correct_prob) / jnp.maximum(k - 1.0, 1.0)
    return jnp.where(kept, jnp.where(is_label, correct_prob, rest), 0.0)


@per_example_loss
def tf_kd_virtual_teacher(
    student_logits: Array, labels: Array, *, correct_prob: float = 0.99, temperature: float = 20.0,
    class_mean: bool = True,
) -> Array:
    """Tf-KD_reg's regularizer: the student against a virtual teacher built from the label, per example.

    The virtual teacher puts ``a = correct_prob`` on the label and ``(1 − a)/(K − 1)`` on every other class
    (``p^d``, :func:`virtual_teacher_probs`). As the official ``loss_kd_regularization`` computes it::

        L = KL( softmax(p^d / T) ‖ softmax(z_s) ) / K          (class_mean=True)

    Where the official code differs from the paper (which writes the regularizer as a KL between the virtual
    teacher's and the student's distributions, both softened by the temperature), jaxkd follows the code:

    * the virtual teacher's *probabilities* ``p^d`` are fed to the softmax as if they were logits, at
      temperature ``T`` (``F.softmax(teacher_soft / T)``): with ``T = 20`` the target is nearly uniform, its
      label entry ``e^{a/T}`` against ``e^{(1−a)/((K−1)T)}`` for the others;
    * the student's distribution is *not* softened (``F.log_softmax(outputs)``, temperature 1), and there is
      no ``T²`` factor;
    * ``nn.KLDivLoss()``'s default ``reduction="mean"`` averages over all ``B·K`` entries, so the per-example
      KL is divided by the number of classes ``K`` (``class_mean=False`` drops that division, the batchmean
      KL); the official runs scale the term back with ``params.multiplier`` (100 for CIFAR-100 ResNet-18).

    The official total is ``(1 − α)·CE + α·multiplier·L`` with ``a = 0.99`` (hard-coded), e.g. ``α = 0.1``,
    ``T = 20``, ``multiplier = 100`` for ResNet-18 on CIFAR-100 (``experiments/base_experiments/
    base_resnet18/params.json``): the spec ``"0.9 * ce + 10 * tf_kd_reg(temperature=20)"``.

    Excluded classes (``-inf`` logits) are left out of the virtual teacher, and ``K`` counts the kept ones.

    Args:
      student_logits: ``[..., C]``.
      labels: integer labels ``[...]``.
      correct_prob: ``a``, in ``(1/C, 1]`` (the label must be the virtual teacher's most likely class).
      temperature: ``T > 0`` applied to the virtual teacher only.
      class_mean: divide by ``K`` as ``nn.KLDivLoss()`` does (default, official).
    """
    check_temperature("temperature", temperature)
    check_in_range("correct_prob", correct_prob, 0.0, 1.0)
    num_classes = np.shape(student_logits)[-1]
    if correct_prob <= 1.0 / num_classes:
        raise ValueError(
            f"correct_prob must be > 1/K = 1/{num_classes} (the label must be the virtual teacher's most likely "
            f"class), got correct_prob={correct_prob!r}"
        )
    if not isinstance(class_mean, bool):
        raise ValueError(f"class_mean must be True or False, got class_mean={class_mean!r}")
    check_labels(labels, student_logits)
    z = to_float(student_logits)
    p_d = virtual_teacher_probs(z, labels, correct_prob=correct_prob)
    kept = ~is_masked(z)
    log_target = log_softmax(jnp.where(kept, p_d, -jnp.inf), temperature)
    value = kl_from_log_probs(log_target, log_softmax(z))
    if class_mean:
        value = value / jnp.maximum(jnp.sum(kept, axis=-1).astype(value.dtype), 1.0)
    return value
