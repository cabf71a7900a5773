"""SRD's feature term: the log of the summed powered differences of batch-normalized embeddings."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_positive
from jaxkd.losses.core import Array, flatten_features, relational_loss

__all__ = ["srd"]


@relational_loss
def srd(student: Array, teacher: Array, *, exponent: float = 4.0, example_weights: Array) -> Array:
    """The feature term of SRD (Miles & Mikolajczyk, "Understanding the Role of the Projector in Knowledge
    Distillation", AAAI 2024), over the batch:

    ``L = log Σ_{i,d} |s_id − t_id|^α``

    summed over every example and dimension of the batch (``α`` = ``exponent``). In the paper and the
    official code (roymiles/Simple-Recipe-Distillation, ``imagenet/torchdistill/losses/single.py``) the
    student's embedding goes through a trainable linear projector and both embeddings through a BatchNorm
    without affine parameters; the log makes the term scale-free (its gradient is the powered difference
    divided by the batch's total). torchdistill's ``SRDLoss`` (``torchdistill/losses/mid_level.py``,
    yoshitomo-matsubara/torchdistill at 3e4373c) returns ``2·L + KL(p_t ‖ p_s)`` (``batchmean``, temperature
    ``τ``, no ``τ²``), with ``α = 4``, ``τ = 1`` on ImageNet; :func:`jaxkd.methods.srd` adds those. The sum
    (not a mean) makes ``L`` shift by ``log B`` with the batch size: gradients do not depend on it.

    With a mask the sum covers the unmasked examples only; a batch whose differences are all zero gives
    ``−inf`` (the log of 0), as the official code does.

    Args:
      student, teacher: ``[B, ...]`` of one shape.
      exponent: ``α > 0``.
    """
    check_positive("exponent", exponent)
    s_shape, t_shape = np.shape(student), np.shape(teacher)
    if len(s_shape) < 1 or s_shape != t_shape:
        raise ValueError(f"srd needs embeddings of one shape [B, ...], got student {s_shape} and teacher {t_shape}")
    s, t = flatten_features(student), flatten_features(teacher)
    dtype = jnp.promote_types(s.dtype, t.dtype)
    valid = (jnp.asarray(example_weights) > 0)[:, None]
    diff = jnp.where(valid, s.astype(dtype) - t.astype(dtype), 0.0)
    powered = jnp.where(valid, jnp.abs(diff) ** exponent, 0.0)
    return jnp.log(jnp.sum(powered))
