"""FSP ("flow of solution procedure"): match the Gram matrices between two layers' feature maps."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxkd.losses.feature.at import match_spatial
from jaxkd.losses.core import Array, per_example_loss

__all__ = ["fsp", "fsp_matrix"]


def fsp_matrix(lower: Array, upper: Array) -> Array:
    """The FSP matrix of two NHWC maps, ``G[b, i, j] = mean_{h,w} F1[b, h, w, i] · F2[b, h, w, j]``,
    ``[B, C1, C2]``; the larger map is first adaptive-average-pooled to the smaller one's size
    (RepDistiller's rule)."""
    lower, upper = match_spatial(lower, upper, what="fsp_matrix")
    positions = lower.shape[1] * lower.shape[2]
    return jnp.einsum("bhwi,bhwj->bij", lower, upper) / positions


@per_example_loss
def fsp(student_lower: Array, student_upper: Array, teacher_lower: Array, teacher_upper: Array) -> Array:
    """FSP per example: ``mean_{i,j} (G_s[i, j] − G_t[i, j])²`` with ``G`` the FSP matrix of a pair of
    layers (:func:`fsp_matrix`, ``G = F1ᵀ F2 / (H·W)``).

    Yim, Joo, Bae & Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization
    and Transfer Learning", CVPR 2017. Follows RepDistiller's ``FSP`` (``distiller_zoo/FSP.py``): the
    squared difference is averaged over the matrix entries (the paper sums it, with a weight per pair),
    and the pairs are consecutive features of different resolutions, the larger map average-pooled to
    the smaller (the paper pairs the input and output of a stage at one resolution). RepDistiller
    transposes ``G`` (``[C2, C1]``); the loss is the same. The student's and the teacher's layers must
    have the same channels (``G`` is ``C1 x C2``).

    Args:
      student_lower, student_upper: the student's pair of NHWC maps ``[B, H, W, C1]``, ``[B, H', W', C2]``.
      teacher_lower, teacher_upper: the teacher's pair, with the same channels ``C1`` and ``C2``.
    """
    for who, (s, t) in (("lower", (student_lower, teacher_lower)), ("upper", (student_upper, teacher_upper))):
        if np.ndim(s) != 4 or np.ndim(t) != 4 or np.shape(s)[-1] != np.shape(t)[-1]:
            raise ValueError(
                f"fsp needs NHWC maps whose channels agree between student and teacher; the {who} maps are "
                f"student {np.shape(s)} and teacher {np.shape(t)}"
            )
    diff = fsp_matrix(student_lower, student_upper) - fsp_matrix(teacher_lower, teacher_upper)
    return jnp.mean(diff * diff, axis=(1, 2))
