"""TGeo-KD: per-sample fusion of KD and CE from the student/teacher/label geometry (Hu et al., ICLR 2024).

Hu, Wu, Wang, Zhu, et al., "Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge
Distillation", ICLR 2024. Inputs, network shape and the lower-level loss follow the official code
(Chengming0501/TGeo-KD ``src/fusion_ratio_bilevel.py``, ``src/network.py``; ``shared/FORMULAS.md`` §9).
The bilevel (upper-level) update is in :mod:`jaxkd.methods.tgeo`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.losses._core import (
    Array,
    Reduction,
    check_labels,
    check_positive,
    check_same_logits,
    is_concrete,
    reduce_loss,
)
from jaxkd.losses.classification import cross_entropy
from jaxkd.losses.divergences import kl_per_example


def class_mean_teacher_probs(teacher_probs: Array, labels: Array, mask: Array | None = None) -> Array:
    """``T̄_i``: the mean teacher probability vector over the batch's (unmasked) examples of ``y_i``'s class."""
    num_classes = teacher_probs.shape[-1]
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if mask is not None:
        onehot = onehot * jnp.asarray(mask, jnp.float32)[:, None]
    sums = onehot.T @ teacher_probs  # [C, C]: per class, summed teacher vectors
    counts = jnp.sum(onehot, axis=0)  # [C]
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    return means[labels]


def fusion_inputs(student_logits: Array, teacher_logits: Array, labels: Array, mask: Array | None = None) -> Array:
    """The official "option 3" input of the fusion network, ``[B, 9C]``, detached:

    ``[S, T, G, T̄, (T̄−S)², (G−S)², (T−S)², (T−G)², (T̄−G)²]`` with ``S``, ``T`` the student and teacher
    probabilities (T = 1), ``G`` the one-hot label and ``T̄`` :func:`class_mean_teacher_probs`.
    """
    check_same_logits(student_logits, teacher_logits)
    check_labels(labels, student_logits)
    s = jax.nn.softmax(jnp.asarray(student_logits, jnp.float32), -1)
    t = jax.nn.softmax(jnp.asarray(teacher_logits, jnp.float32), -1)
    g = jax.nn.one_hot(labels, s.shape[-1], dtype=jnp.float32)
    t_bar = class_mean_teacher_probs(t, labels, mask)
    parts = [s, t, g, t_bar, (t_bar - s) ** 2, (g - s) ** 2, (t - s) ** 2, (t - g) ** 2, (t_bar - g) ** 2]
    return jax.lax.stop_gradient(jnp.concatenate(parts, axis=-1))


def fused_kd_ce(
    student_logits: Array,
    teacher_logits: Array,
    labels: Array,
    ratio: Array,
    *,
    temperature: float = 1.5,
    mask: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """``mean_i [α_i · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − α_i) · CE(z_s, y)]``.

    ``ratio`` is the per-example ``α_i ∈ [0, 1]``. (The official code applies its CE to the student's
    softmax output, i.e. softmax twice; jaxkd uses the ordinary CE on logits.)
    """
    check_positive("temperature", temperature)
    if is_concrete(ratio) and np.size(ratio):
        lo, hi = float(np.min(ratio)), float(np.max(ratio))
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"ratio must lie in [0, 1], got values in [{lo}, {hi}]")
    kd = temperature**2 * kl_per_example(teacher_logits, student_logits, temperature=temperature)
    ce = cross_entropy(student_logits, labels, reduction="none")
    per_example = ratio * kd + (1.0 - ratio) * ce
    return reduce_loss(per_example, mask=mask, reduction=reduction)
