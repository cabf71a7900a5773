"""The ND loss: student embeddings towards the direction of the teacher's class mean, with a large norm."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_label_values
from jaxkd.losses.core import Array, l2_normalize, per_example_loss, safe_sqrt, to_float

__all__ = ["nd"]


@per_example_loss
def nd(student_embedding: Array, teacher_embedding: Array, labels: Array, class_means: Array) -> Array:
    """The ND (norm and direction) loss (Wang, Cheng, Duan, Wang, Feng & Kong, "Improving Knowledge Distillation via
    Regularizing Feature Norm and Direction", arXiv:2305.17007, 2023), per example.

    With ``s`` the student's embedding, ``t`` the teacher's, and ``e_y = c_y / ‖c_y‖`` the unit direction
    of the teacher's class mean of the example's label:

    ``L = 1 − ⟨s, e_y⟩ / max(‖s‖, ‖t‖)``

    The projection of ``s`` on the class-mean direction, relative to the larger of the two norms: it is
    minimized by ``s`` pointing along ``e_y`` *and* with a norm at least the teacher's (the paper's
    Eq. 9: direction alignment and a large norm in one term). This is the official ``DirectNormLoss``
    (``CIFAR/utils.py`` of github.com/WangYZ1608/Knowledge-Distillation-via-ND), per example (the official
    sums and divides by the batch size: the mean). A zero class mean (a class without examples) has no
    direction: ``e_y = 0`` and the loss is 1 (the official code divides by zero there).

    Args:
      student_embedding: ``[B, D]``, the student's embedding (after a projector when the widths differ).
      teacher_embedding: ``[B, D]``, the teacher's embedding of the same examples.
      labels: integer labels ``[B]``.
      class_means: ``[K, D]``, the teacher's class means (:func:`class_means`).
    """
    s, t, c = to_float(student_embedding), to_float(teacher_embedding), to_float(class_means)
    if s.ndim != 2 or s.shape != t.shape:
        raise ValueError(
            f"nd needs student and teacher embeddings of one shape [B, D], got {s.shape} and {t.shape}"
        )
    if c.ndim != 2 or c.shape[1] != s.shape[1]:
        raise ValueError(f"class_means must be [K, D] with D = {s.shape[1]}, got shape {c.shape}")
    if np.shape(labels) != s.shape[:1]:
        raise ValueError(f"labels must have shape {s.shape[:1]}, got {np.shape(labels)}")
    check_label_values(labels, c.shape[0])
    labels = jnp.asarray(labels)
    valid = (labels >= 0) & (labels < c.shape[0])
    direction = l2_normalize(c, axis=-1)[jnp.clip(labels, 0, c.shape[0] - 1)]
    s_norm = safe_sqrt(jnp.sum(s * s, axis=-1))
    t_norm = safe_sqrt(jnp.sum(t * t, axis=-1))
    scale = jnp.maximum(s_norm, t_norm)
    projection = jnp.sum(s * direction, axis=-1)
    value = 1.0 - projection / jnp.where(scale > 0, scale, 1.0)
    return jnp.where(valid, value, jnp.nan)
