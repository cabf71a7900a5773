"""Variational information distillation: the negative log-likelihood of the teacher's feature under a
Gaussian whose mean the student predicts, with a learned per-channel variance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_positive
from jaxkd.losses.core import Array, per_example_loss, to_float

__all__ = ["vid"]


@per_example_loss
def vid(prediction: Array, teacher_features: Array, log_scale: Array, *, eps: float = 1e-5) -> Array:
    """Variational information distillation (Ahn, Hu, Damianou, Lawrence & Dai, "Variational Information
    Distillation for Knowledge Transfer", CVPR 2019), per example.

    With ``μ = prediction`` (the student's regressor output), ``t = teacher_features`` (both ``[B, ..., C]``,
    channels last) and ``σ²_c = softplus(α_c) + ε`` per channel (``α = log_scale [C]``):

    ``L = mean_{..., c} ½ · ((μ − t)² / σ²_c + log σ²_c)``

    the Gaussian negative log-likelihood of Eq. 2 and 5 of the paper without its constant, averaged over
    the positions and channels of each example (so the batch mean is the mean over every element, as in
    the official code). Follows RepDistiller's ``VIDLoss`` (``distiller_zoo/VID.py``, "code from
    author"; mdistiller's ``vid_loss`` is the same): ``σ² = log(1 + exp(α)) + ε``, ``ε = 1e-5``.

    Args:
      prediction: ``[B, ..., C]``.
      teacher_features: ``[B, ..., C]`` of the prediction's shape.
      log_scale: ``[C]``, the variance's pre-softplus parameter ``α``.
      eps: ``ε > 0``, the variance's floor.
    """
    check_positive("eps", eps)
    p, t, a = np.shape(prediction), np.shape(teacher_features), np.shape(log_scale)
    if p != t or len(p) < 2:
        raise ValueError(f"vid needs a prediction and teacher features of one shape [B, ..., C], got {p} and {t}")
    if a != p[-1:]:
        raise ValueError(f"vid needs log_scale of shape [C] = {p[-1:]} (one per channel), got {a}")
    mu, target, alpha = to_float(prediction), to_float(teacher_features), to_float(log_scale)
    dtype = jnp.promote_types(jnp.promote_types(mu.dtype, target.dtype), alpha.dtype)
    mu, target, alpha = mu.astype(dtype), target.astype(dtype), alpha.astype(dtype)
    variance = jax.nn.softplus(alpha) + eps
    nll = 0.5 * ((mu - target) ** 2 / variance + jnp.log(variance))
    return jnp.mean(nll.reshape(p[0], -1), axis=-1)
