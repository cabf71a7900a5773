"""TGeo-KD: per-sample fusion of KD and CE from the student/teacher/label geometry (Hu, Wu, Wang, Zhu,
et al., "Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge Distillation", ICLR 2024).

Inputs, network shape and the lower-level loss follow the official code (``Chengming0501/TGeo-KD``,
``src/fusion_ratio_bilevel.py``, ``src/network.py``). The bilevel (upper-level) update is in
:mod:`jaxkd.methods.logit.tgeo_kd`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd.checks import check_labels, check_same_logits, check_values_in_range
from jaxkd.losses.logit.classification import cross_entropy, kd
from jaxkd.losses.core import Array, label_one_hot, log_softmax, per_example_loss, probs

__all__ = ["class_mean_teacher_probs", "fusion_inputs", "tgeo_kd"]


def class_mean_teacher_probs(teacher_probs: Array, labels: Array, mask: Array | None = None) -> Array:
    """``T̄_i``: the mean teacher probability vector over the batch's (unmasked) examples of ``y_i``'s class."""
    one_hot = label_one_hot(labels, teacher_probs.shape[-1])[0].astype(teacher_probs.dtype)
    if mask is not None:
        one_hot = one_hot * jnp.asarray(mask, teacher_probs.dtype)[:, None]
    sums = one_hot.T @ teacher_probs  # [C, C]: per class, summed teacher vectors
    counts = jnp.sum(one_hot, axis=0)  # [C]
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    return means[labels]


def fusion_inputs(student_logits: Array, teacher_logits: Array, labels: Array, mask: Array | None = None) -> Array:
    """The official "option 3" input of the fusion network, ``[B, 9C]``, detached:

    ``[S, T, G, T̄, (T̄−S)², (G−S)², (T−S)², (T−G)², (T̄−G)²]`` with ``S``, ``T`` the student and teacher
    probabilities (T = 1), ``G`` the one-hot label and ``T̄`` :func:`class_mean_teacher_probs`.
    """
    check_same_logits(student_logits, teacher_logits)
    check_labels(labels, student_logits)
    s = probs(log_softmax(student_logits))
    t = probs(log_softmax(teacher_logits))
    g = label_one_hot(labels, s.shape[-1])[0].astype(s.dtype)
    t_bar = class_mean_teacher_probs(t, labels, mask)
    parts = [s, t, g, t_bar, (t_bar - s) ** 2, (g - s) ** 2, (t - s) ** 2, (t - g) ** 2, (t_bar - g) ** 2]
    return jax.lax.stop_gradient(jnp.concatenate(parts, axis=-1))


@per_example_loss
def tgeo_kd(
    student_logits: Array, teacher_logits: Array, labels: Array, ratio: Array, *, temperature: float = 1.5
) -> Array:
    """TGeo-KD's lower-level loss ``α_i · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − α_i) · CE(z_s, y)``
    per example, with the per-example fusion ratio ``α_i = ratio[i] ∈ [0, 1]``.

    (The official code applies its CE to the student's softmax output, i.e. softmax twice; jaxkd uses the
    ordinary CE on logits.)
    """
    check_values_in_range("ratio", ratio, 0.0, 1.0)
    distill = kd(student_logits, teacher_logits, temperature=temperature, reduction="none")
    ce = cross_entropy(student_logits, labels, reduction="none")
    return ratio * distill + (1.0 - ratio) * ce
