"""OFD: partial L2 between a connector of the student's pre-ReLU feature and the teacher's margin-ReLU feature."""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax.scipy.stats import norm

from jaxkd.losses.core import Array, per_example_loss, to_float

__all__ = ["ofd", "ofd_margin"]


def ofd_margin(scale: Array, bias: Array) -> Array:
    """The margin of each channel: ``E[x | x < 0]`` for ``x ~ N(m, s²)`` with ``s = |scale|``, ``m = bias``
    the affine parameters of the BatchNorm before the ReLU (its output distribution per channel):

    ``margin = m − s·φ(m/s) / Φ(−m/s)`` when ``Φ(−m/s) > 0.001``, else ``−3s``

    as the official ``get_margin_from_BN`` (clovaai/overhaul-distillation, ``distiller.py``), which reads
    ``bn.weight`` / ``bn.bias`` (not the running statistics).
    """
    s = jnp.abs(to_float(scale))
    m = to_float(bias)
    if s.shape != m.shape:
        raise ValueError(f"ofd_margin takes scale and bias of one shape, got {s.shape} and {m.shape}")
    cdf = norm.cdf(-m / s)
    tail = cdf > 0.001
    safe_cdf = jnp.where(tail, cdf, 1.0)
    pdf = jnp.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi)
    return jnp.where(tail, -s * pdf / safe_cdf + m, -3.0 * s)


@per_example_loss
def ofd(student_feature: Array, teacher_feature: Array, margin: Array) -> Array:
    """OFD's distillation loss (Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019),
    per example: with the teacher's pre-ReLU feature through the margin ReLU ``t̃ = max(t, margin)``,

    ``l = Σ_{h,w,c} (s − t̃)² · [(s > t̃) or (t̃ > 0)]``

    (the partial L2: no loss where the teacher is negative and the student is already below it). The
    official code (clovaai/overhaul-distillation, ``CIFAR-100/distiller.py``: ``distillation_loss``) sums
    over the batch too and divides the total by ``batch_size · 1000`` in the training loop; here the
    mean over the batch gives ``sum / batch_size`` and the ``1/1000`` is the method's weight
    (``ce + 0.001 * ofd``).

    Args:
      student_feature: the connector's output ``[B, ..., C]`` (the student's pre-ReLU feature through
        1x1 conv + BN), of the teacher feature's shape.
      teacher_feature: the teacher's pre-ReLU feature ``[B, ..., C]``.
      margin: ``[C]``, per channel (:func:`ofd_margin`), broadcast over the last axis.
    """
    if jnp.shape(student_feature) != jnp.shape(teacher_feature):
        raise ValueError(
            f"ofd takes student (after the connector) and teacher features of one shape, got "
            f"{jnp.shape(student_feature)} and {jnp.shape(teacher_feature)}"
        )
    if jnp.shape(margin) not in ((jnp.shape(teacher_feature)[-1],), ()):
        raise ValueError(
            f"ofd: margin must have one entry per channel, shape ({jnp.shape(teacher_feature)[-1]},), got {jnp.shape(margin)}"
        )
    s = to_float(student_feature)
    t = jnp.maximum(to_float(teacher_feature), to_float(margin))
    keep = (s > t) | (t > 0) | jnp.isnan(s) | jnp.isnan(t)  # NaN propagates, never masked away
    sq = jnp.where(keep, (s - t) ** 2, 0.0)
    return jnp.sum(sq.reshape(sq.shape[0], -1), axis=-1)
