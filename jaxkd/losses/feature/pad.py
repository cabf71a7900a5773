"""Prime-aware adaptive distillation: an L2 hint weighted per dimension by a learned variance."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_positive
from jaxkd.losses.core import Array, flatten_features, per_example_loss

__all__ = ["pad_l2"]


@per_example_loss
def pad_l2(student: Array, teacher: Array, log_variance: Array, *, eps: float = 1e-6) -> Array:
    """PAD-L2 (Zhang et al., "Prime-Aware Adaptive Distillation", ECCV 2020), per example.

    With the embeddings ``s``, ``t`` and the student's predicted log-variances ``v = log σ²`` flattened to
    ``D`` values each (one shape):

    ``l = (1/D) Σ_d [ (t_d − s_d)² / (eps + exp(v_d)) + v_d ]``

    the negative log-likelihood of the teacher's embedding under a Gaussian centred on the student's, up to
    constants: dimensions (and examples) the student finds hard get a large variance and a small weight,
    the ``+ v`` term keeps the variances from growing without bound. This is torchdistill's ``PADL2Loss``
    (``torchdistill/losses/mid_level.py``, yoshitomo-matsubara/torchdistill at 3e4373c), which averages
    over the dimensions ("the author's provided code takes average of losses"; the paper's Gaussian
    likelihood may scale the two terms differently — not checked here, torchdistill's form is what this
    computes, so its weights carry over). ``v`` comes from the student's variance branch (torchdistill's ``VarianceBranch4PAD``: a linear
    layer and BatchNorm on the student's pooled features), trained with this loss.

    Args:
      student, teacher, log_variance: ``[B, ...]`` of one shape.
      eps: ``> 0``, guards the division.
    """
    check_positive("eps", eps)
    shapes = np.shape(student), np.shape(teacher), np.shape(log_variance)
    if len(shapes[0]) < 1 or len(set(shapes)) != 1:
        raise ValueError(f"pad_l2 needs student, teacher and log_variance of one shape [B, ...], got {shapes}")
    s, t, v = flatten_features(student), flatten_features(teacher), flatten_features(log_variance)
    dtype = jnp.promote_types(jnp.promote_types(s.dtype, t.dtype), v.dtype)
    s, t, v = s.astype(dtype), t.astype(dtype), v.astype(dtype)
    return jnp.mean((t - s) ** 2 / (eps + jnp.exp(v)) + v, axis=-1)
