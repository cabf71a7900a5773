"""Deep mutual learning: every network learns from the labels and from the others' predictions."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_labels, check_temperature
from jaxkd.losses.core import Array, kl_from_log_probs, log_softmax, per_example_loss
from jaxkd.losses.logit.classification import cross_entropy

__all__ = ["dml"]


@per_example_loss
def dml(logits: Array, target_logits: Array, labels: Array, *, temperature: float = 1.0) -> Array:
    """Deep mutual learning (Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018), per example.

    For ``K >= 2`` networks with logits ``z_k`` (``logits[..., k, :]``):

    ``L = Σ_k [ CE(z_k, y) + T²/(K−1) · Σ_{l≠k} KL(softmax(z̃_l/T) ‖ softmax(z_k/T)) ]``

    where ``z̃ = target_logits`` are the same logits gradient-stopped by the caller: each network is
    pulled towards the others' predictions, never the others towards it through this term (the paper's
    ``L_Θk = L_C + 1/(K−1) Σ_l D_KL(p_l ‖ p_k)``, Eq. 10, with ``p_l`` a constant for ``Θ_k``). The paper
    updates the networks one after another within a step; minimizing this sum updates them all from the
    same forward pass (what most reimplementations do). ``T = 1`` is the paper's; ``T²`` keeps gradient
    scales comparable for ``T ≠ 1``.

    Args:
      logits: ``[..., K, C]``, the networks stacked before the class axis.
      target_logits: ``[..., K, C]``: ``jax.lax.stop_gradient(logits)`` in training.
      labels: integer labels ``[...]``.
      temperature: ``T``.
    """
    check_temperature("temperature", temperature)
    k = np.shape(logits)[-2] if np.ndim(logits) >= 2 else 0
    if k < 2:
        raise ValueError(f"deep mutual learning needs at least 2 networks stacked as [..., K, C], got shape {np.shape(logits)}")
    if np.shape(target_logits) != np.shape(logits):
        raise ValueError(f"target_logits must have the shape of logits, got {np.shape(target_logits)} and {np.shape(logits)}")
    check_labels(labels, logits[..., 0, :])
    ce = sum(cross_entropy(logits[..., i, :], labels, reduction="none") for i in range(k))
    log_p = log_softmax(logits, temperature)
    log_q = log_softmax(target_logits, temperature)
    # kl[..., l, k] = KL(q_l ‖ p_k); the diagonal (a network and its own target) is excluded.
    kl = kl_from_log_probs(log_q[..., :, None, :], log_p[..., None, :, :])
    off_diagonal = 1.0 - jnp.eye(k, dtype=kl.dtype)
    return ce + temperature**2 / (k - 1) * jnp.sum(kl * off_diagonal, axis=(-2, -1))
