"""Attention transfer: match the normalized spatial attention maps of student and teacher."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_positive
from jaxkd.losses.core import Array, l2_normalize, per_example_loss, to_float

__all__ = ["at"]


def _pool_matrix(size: int, out: int, dtype) -> np.ndarray:
    """PyTorch's ``adaptive_avg_pool`` along one axis as an ``[out, size]`` averaging matrix: output ``i``
    averages inputs ``floor(i·size/out) .. ceil((i+1)·size/out) − 1``."""
    m = np.zeros((out, size), np.float64)
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        m[i, start:end] = 1.0 / (end - start)
    return jnp.asarray(m, dtype)


def adaptive_avg_pool(x: Array, out_hw: tuple[int, int]) -> Array:
    """``F.adaptive_avg_pool2d`` of an NHWC map ``[B, H, W, C]`` to ``out_hw`` (exact, any sizes)."""
    x = to_float(x)
    (h, w), (oh, ow) = x.shape[1:3], out_hw
    if (h, w) == (oh, ow):
        return x
    return jnp.einsum("ih,jw,bhwc->bijc", _pool_matrix(h, oh, x.dtype), _pool_matrix(w, ow, x.dtype), x)


def match_spatial(a: Array, b: Array, *, what: str) -> tuple[Array, Array]:
    """Two NHWC maps brought to one spatial size, as RepDistiller's AT/NST/FSP do: the larger map is
    adaptive-average-pooled to the smaller one's size (each axis to the smaller of the two)."""
    if np.ndim(a) != 4 or np.ndim(b) != 4:
        raise ValueError(f"{what} needs NHWC feature maps [B, H, W, C], got shapes {np.shape(a)} and {np.shape(b)}")
    if np.shape(a)[0] != np.shape(b)[0]:
        raise ValueError(f"{what}: the two maps have different batch sizes, shapes {np.shape(a)} and {np.shape(b)}")
    out = (min(np.shape(a)[1], np.shape(b)[1]), min(np.shape(a)[2], np.shape(b)[2]))
    return adaptive_avg_pool(a, out), adaptive_avg_pool(b, out)


def attention_map(feature: Array, p: float = 2.0) -> Array:
    """``normalize(mean_c |f|^p)`` flattened over positions, ``[B, H·W]`` (AT's spatial attention)."""
    f = to_float(feature)
    q = jnp.mean(jnp.abs(f) ** p, axis=-1)
    return l2_normalize(q.reshape(q.shape[0], -1), axis=-1)


@per_example_loss
def at(student: Array, teacher: Array, *, p: float = 2.0) -> Array:
    """Attention transfer per example: ``mean_positions (Q_s − Q_t)²`` with ``Q = normalize(mean_c |f|^p)``.

    Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
    Convolutional Neural Networks via Attention Transfer", ICLR 2017. The attention map of an NHWC map
    ``f`` is the channel mean of ``|f|^p`` (``p = 2``), flattened over the positions and L2-normalized.
    Follows RepDistiller's ``Attention`` (``distiller_zoo/AT.py``): the squared difference averaged over
    the positions (and the batch), where the paper writes ``β/2 ‖Q_s/‖Q_s‖ − Q_t/‖Q_t‖‖₂`` (a norm, not
    its square); RepDistiller uses ``f^p``, the paper ``|f|^p`` (the same for ``p = 2``). When the
    spatial sizes differ, the larger map is adaptive-average-pooled to the smaller one's size, as
    RepDistiller does; the channel counts may differ (attention maps have none).

    Args:
      student, teacher: NHWC maps ``[B, H, W, C]``.
      p: the exponent (> 0).
    """
    check_positive("p", p)
    student, teacher = match_spatial(student, teacher, what="at")
    diff = attention_map(student, p) - attention_map(teacher, p)
    return jnp.mean(diff * diff, axis=-1)
