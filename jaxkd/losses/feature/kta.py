"""Knowledge adaptation for semantic segmentation: the adapted-feature loss (KTA) and the affinity loss."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_positive
from jaxkd.losses.core import Array, flatten_features, l2_normalize, per_example_loss, safe_sqrt, to_float

__all__ = ["affinity", "kta"]


def _lp_norm(x: Array, p: float, axis: int = -1) -> Array:
    """``(Σ |x|^p)^(1/p)`` along ``axis`` (``p = 2`` through :func:`safe_sqrt`: a zero gradient at 0)."""
    if p == 2:
        return safe_sqrt(jnp.sum(x * x, axis=axis))
    return jnp.sum(jnp.abs(x) ** p, axis=axis) ** (1.0 / p)


@per_example_loss
def kta(student_adapted: Array, teacher_translated: Array, *, p: float = 1, q: float = 2, eps: float = 1e-12) -> Array:
    """Knowledge translation and adaptation (He, Shen, Tian, Gong, Sun & Yan, "Knowledge Adaptation for
    Efficient Semantic Segmentation", CVPR 2019, Eq. 2), per example.

    Both features are flattened per example and scaled to unit ``q``-norm,
    ``â = a / max(‖a‖_q, eps)``, then compared:

    * ``p = 1``: ``l = (1/D) Σ_d |ŝ_d − t̂_d|`` (torchdistill's ``nn.functional.l1_loss(reduction="mean")``:
      the mean over the batch of this per-example mean);
    * otherwise: ``l = ‖ŝ − t̂‖_p``.

    This is torchdistill's ``KTALoss`` (``torchdistill/losses/mid_level.py``, yoshitomo-matsubara/torchdistill
    at 3e4373c; its COCO sample uses ``p: 1``, ``q: 2``). The student side is the student's feature through a
    trainable adapter (``Student4KTAAD.feature_adapter``: conv, BN, ReLU); the teacher side is the
    teacher's feature through the encoder of a factor-transfer paraphraser trained beforehand (the
    "knowledge translator"). torchdistill divides by the plain norm (a zero feature gives NaN); here the
    norm is clamped at ``eps`` (PyTorch's ``F.normalize`` convention), so a zero feature stays zero.

    Args:
      student_adapted, teacher_translated: ``[B, ...]`` of one shape.
      p: the norm of the difference, ``≥ 1`` (1 is the per-example mean absolute difference).
      q: the normalizing norm, ``≥ 1``.
      eps: ``> 0``, the clamp of the normalizing norm.
    """
    for name, value in (("p", p), ("q", q)):
        check_positive(name, value)
        if value < 1:
            raise ValueError(f"{name} must be a norm order >= 1, got {name}={value!r}")
    check_positive("eps", eps)
    s_shape, t_shape = np.shape(student_adapted), np.shape(teacher_translated)
    if len(s_shape) < 1 or s_shape != t_shape:
        raise ValueError(f"kta needs features of one shape [B, ...], got student {s_shape} and teacher {t_shape}")
    s, t = flatten_features(student_adapted), flatten_features(teacher_translated)
    dtype = jnp.promote_types(s.dtype, t.dtype)
    s, t = s.astype(dtype), t.astype(dtype)
    s = s / jnp.maximum(_lp_norm(s, q), eps)[:, None]
    t = t / jnp.maximum(_lp_norm(t, q), eps)[:, None]
    if p == 1:
        return jnp.mean(jnp.abs(s - t), axis=-1)
    return _lp_norm(s - t, p)


@per_example_loss
def affinity(student: Array, teacher: Array) -> Array:
    """Affinity distillation (He et al., "Knowledge Adaptation for Efficient Semantic Segmentation",
    CVPR 2019, Eq. 4), per example.

    For ``[B, H, W, C]`` maps of one shape, each channel's map is flattened over the ``N = HW`` positions
    and scaled to unit L2 norm, ``a_c``; its affinity matrix is the ``N x N`` outer product ``a_c a_cᵀ / N``.
    The loss sums over the channels the Frobenius distance between the student's and the teacher's:

    ``l = Σ_c ‖a_s,c a_s,cᵀ − a_t,c a_t,cᵀ‖_F / N``

    as torchdistill's ``AffinityLoss`` computes it (``torchdistill/losses/mid_level.py``,
    yoshitomo-matsubara/torchdistill at 3e4373c; NCHW there, the same per-channel maps). The ``N x N``
    matrices are never built: for unit vectors ``‖a aᵀ − b bᵀ‖_F² = 2(1 − (a·b)²) = ‖a − b‖²·‖a + b‖² / 2``,
    and the product form has no cancellation when the maps agree. The student side is the student's map
    through a trainable 1x1 convolution (``Student4KTAAD.affinity_adapter``), the teacher's the
    paraphraser's encoding. torchdistill divides by the plain norm (an all-zero channel gives NaN); here
    it stays zero (:func:`jaxkd.losses.core.l2_normalize`) and, the identity assuming unit vectors,
    contributes ``‖b‖² / (√2·N)`` with ``b`` the other side's unit map: finite, where torchdistill's is NaN.

    Args:
      student, teacher: ``[B, H, W, C]`` (or ``[B, N, C]``) of one shape.
    """
    s_shape, t_shape = np.shape(student), np.shape(teacher)
    if len(s_shape) < 3 or s_shape != t_shape:
        raise ValueError(f"affinity needs maps of one shape [B, H, W, C], got student {s_shape} and teacher {t_shape}")
    b, c = s_shape[0], s_shape[-1]
    s, t = to_float(student).reshape(b, -1, c), to_float(teacher).reshape(b, -1, c)
    dtype = jnp.promote_types(s.dtype, t.dtype)
    n = s.shape[1]
    s, t = l2_normalize(s.astype(dtype), axis=1), l2_normalize(t.astype(dtype), axis=1)
    minus = safe_sqrt(jnp.sum((s - t) ** 2, axis=1))
    plus = safe_sqrt(jnp.sum((s + t) ** 2, axis=1))
    return jnp.sum(minus * plus, axis=-1) / (np.sqrt(2.0) * n)
