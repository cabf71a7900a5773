"""ReviewKD's hierarchical context loss (HCL): multi-level pooled MSE between fused student features and
the teacher's."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from jaxkd.losses.core import Array, per_example_loss, to_float

__all__ = ["reviewkd"]

#: The pyramid levels of the official ``hcl`` (output sizes ``l x l``), finest first.
HCL_LEVELS = (4, 2, 1)


def _adaptive_pool_matrix(size: int, out: int) -> np.ndarray:
    """``[out, size]`` averaging weights of PyTorch's ``adaptive_avg_pool`` along one axis: output ``i``
    averages inputs ``floor(i·size/out) .. ceil((i+1)·size/out) − 1`` (windows overlap when ``out`` does
    not divide ``size``)."""
    m = np.zeros((out, size))
    for i in range(out):
        lo, hi = (i * size) // out, -((-(i + 1) * size) // out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def _pool(x: Array, l: int) -> Array:
    _, h, w, _ = x.shape
    ph, pw = (jnp.asarray(_adaptive_pool_matrix(n, l), x.dtype) for n in (h, w))
    return jnp.einsum("ih,bhwc,jw->bijc", ph, x, pw)


def _mse(a: Array, b: Array) -> Array:
    d = (a - b).reshape(a.shape[0], -1)
    return jnp.mean(d * d, axis=-1)


@per_example_loss
def reviewkd(student_features: Sequence[Array], teacher_features: Sequence[Array]) -> Array:
    """ReviewKD's hierarchical context loss (Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge
    Review", CVPR 2021), per example, as the official ``hcl`` (dvlab-research/ReviewKD,
    ``CIFAR-100/model/reviewkd.py``) computes it:

    for each pair of NHWC maps ``(f_s, f_t)`` of size ``h``: ``MSE(f_s, f_t)`` plus, for each level
    ``l ∈ (4, 2, 1)`` with ``l < h``, ``w_l · MSE(pool_l(f_s), pool_l(f_t))`` with ``w_l`` halving
    (``1/2, 1/4, 1/8``) and ``pool_l`` the adaptive average pooling to ``l x l``; divided by the sum of
    the weights (``1 + Σ w_l``); summed over the pairs. MSEs are means over a map's entries, so the
    batch mean is the official ``F.mse_loss(reduction='mean')``.

    Args:
      student_features: maps ``[B, H, W, C]`` (in ReviewKD: the student's features after the ABF fusion).
      teacher_features: the teacher's maps, one per student map, of the same shapes.
    """
    student_features, teacher_features = list(student_features), list(teacher_features)
    if not student_features or len(student_features) != len(teacher_features):
        raise ValueError(
            f"reviewkd takes one teacher map per student map, got {len(student_features)} and {len(teacher_features)}"
        )
    total = None
    for fs, ft in zip(student_features, teacher_features):
        if jnp.shape(fs) != jnp.shape(ft) or len(jnp.shape(fs)) != 4:
            raise ValueError(
                f"reviewkd compares [B, H, W, C] maps of one shape, got student {jnp.shape(fs)} and teacher {jnp.shape(ft)}"
            )
        fs, ft = to_float(fs), to_float(ft)
        h = fs.shape[1]
        loss, cnt, tot = _mse(fs, ft), 1.0, 1.0
        for l in HCL_LEVELS:
            if l >= h:
                continue
            cnt /= 2.0
            loss = loss + _mse(_pool(fs, l), _pool(ft, l)) * cnt
            tot += cnt
        loss = loss / tot
        total = loss if total is None else total + loss
    return total
