"""Activation-boundary distillation: teach the student which of the teacher's neurons are active, with a
margin, on pre-ReLU features."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_nonnegative
from jaxkd.losses.core import Array, per_example_loss, to_float

__all__ = ["activation_boundary"]


@per_example_loss
def activation_boundary(student_preact: Array, teacher_preact: Array, *, margin: float = 1.0) -> Array:
    """Activation-boundary loss (Heo, Lee, Yun & Choi, "Knowledge Transfer via Distillation of Activation
    Boundaries Formed by Hidden Neurons", AAAI 2019), per example.

    With ``s`` the student's pre-activation (through a connector) and ``t`` the teacher's, both
    ``[B, ...]`` of one shape, and margin ``m``:

    ``L = Σ_{elements} (s + m)² · [s > −m ∧ t ≤ 0] + (s − m)² · [s ≤ m ∧ t > 0]``

    the squared-hinge "alternative" loss of Eq. 6 of the paper (a differentiable surrogate of matching
    the activation pattern ``[t > 0]``), summed over each example's elements. Follows the authors' code
    (``bhheo/AB_distillation``, ``criterion_alternative_L2``) as RepDistiller's ``ABLoss``
    (``distiller_zoo/AB.py``) runs it; RepDistiller's batch mean, layer weights ``2^(i−n+1)`` and factor
    ``3/1000`` are the method's (:func:`jaxkd.methods.activation_boundary`).

    Args:
      student_preact: ``[B, ...]``.
      teacher_preact: ``[B, ...]`` of the student's shape.
      margin: ``m >= 0``.
    """
    check_nonnegative("margin", margin)
    s, t = np.shape(student_preact), np.shape(teacher_preact)
    if s != t or len(s) < 1:
        raise ValueError(
            f"activation_boundary needs student and teacher pre-activations of one shape [B, ...], got student "
            f"{s} and teacher {t} (map the student's through a connector)"
        )
    x, y = to_float(student_preact), to_float(teacher_preact)
    dtype = jnp.promote_types(x.dtype, y.dtype)
    x, y = x.astype(dtype), y.astype(dtype)
    inactive = (x > -margin) & (y <= 0)
    active = (x <= margin) & (y > 0)
    # A NaN in either input makes both comparisons false; keep it visible.
    nan = jnp.isnan(x) | jnp.isnan(y)
    per_element = jnp.where(inactive, (x + margin) ** 2, 0.0) + jnp.where(active, (x - margin) ** 2, 0.0)
    per_element = jnp.where(nan, jnp.nan, per_element)
    return jnp.sum(per_element.reshape(s[0], -1), axis=-1)
