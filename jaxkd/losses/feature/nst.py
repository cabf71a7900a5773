"""Neuron selectivity transfer: the MMD between the distributions of student and teacher channel maps."""

from __future__ import annotations

import jax.numpy as jnp

from jaxkd.checks import check_int, check_nonnegative
from jaxkd.losses.feature.at import match_spatial
from jaxkd.losses.core import Array, l2_normalize, per_example_loss

__all__ = ["nst"]


@per_example_loss
def nst(student: Array, teacher: Array, *, degree: int = 2, constant: float = 0.0) -> Array:
    """Neuron selectivity transfer per example: the squared MMD with a polynomial kernel between the
    student's and the teacher's channels, each channel's spatial map L2-normalized.

    Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer", 2017. With
    ``s_i`` (``i < C_s``) and ``t_j`` (``j < C_t``) the channels of one example flattened over positions
    and normalized, and ``k(x, y) = (x·y + c)^d``:

    ``MMD² = mean_{i,i'} k(s_i, s_i') + mean_{j,j'} k(t_j, t_j') − 2 mean_{i,j} k(s_i, t_j)``.

    The paper's choice (and RepDistiller's ``NSTLoss``, ``distiller_zoo/NST.py``, with its full loss) is
    ``d = 2``, ``c = 0``. The channel counts may differ; when the spatial sizes differ, the larger map
    is adaptive-average-pooled to the smaller one's size, as RepDistiller does. The teacher-teacher
    term has no effect on the student (RepDistiller detaches it); it makes the value an MMD (>= 0).

    Args:
      student, teacher: NHWC maps ``[B, H, W, C_s]`` and ``[B, H', W', C_t]``.
      degree: ``d``, an integer >= 1.
      constant: ``c >= 0``.
    """
    degree = check_int("degree", degree, low=1)
    check_nonnegative("constant", constant)
    student, teacher = match_spatial(student, teacher, what="nst")

    def channels(f):  # [B, H, W, C] -> [B, C, H·W], each channel unit-norm over the positions
        f = f.reshape(f.shape[0], -1, f.shape[-1])
        return l2_normalize(jnp.swapaxes(f, 1, 2), axis=-1)

    s, t = channels(student), channels(teacher)

    def kernel_mean(a, b):
        return jnp.mean((jnp.einsum("bip,bjp->bij", a, b) + constant) ** degree, axis=(1, 2))

    return kernel_mean(t, t) + kernel_mean(s, s) - 2.0 * kernel_mean(s, t)
