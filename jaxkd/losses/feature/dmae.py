"""DMAE: feature distillation from a masked-input student (Bai et al., "Masked Autoencoders Enable Efficient
Knowledge Distillers", CVPR 2023)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_choice
from jaxkd.losses.core import Array, l2_normalize, per_example_loss, to_float

__all__ = ["dmae"]


@per_example_loss
def dmae(
    student_features: Array,
    teacher_features: Array,
    visible: Array | None = None,
    *,
    distance: str = "l1",
    normalize: bool = True,
) -> Array:
    """DMAE's feature-alignment loss (Bai, Wang, Xiao, Wei, Wang, Yuille, Zhou & Xie, "Masked Autoencoders
    Enable Efficient Knowledge Distillers", CVPR 2023), per example.

    With ``f_s`` the (projected) student features computed from the masked input and ``f_t`` the teacher's
    (in the official code, of the same masked input: see :func:`jaxkd.methods.dmae`, ``teacher_sees``),
    at positions ``p`` (tokens, or the ``H·W`` positions of an NHWC map) and channels ``c``:

    ``L = Σ_p v_p Σ_c d(n(f_s)_{p,c}, n(f_t)_{p,c}) / (D · Σ_p v_p)``

    where ``n`` is the ``l2`` normalization over channels (``normalize``) and ``d`` is ``|a − b|``
    (``"l1"``) or ``(a − b)²`` (``"l2"``); ``v`` marks the positions that are compared (``visible``,
    default all). The official code (github.com/UCSC-VLAA/DMAE, ``models_mae_distill.py``,
    ``forward_distillation_loss_embedding``) uses ``nn.L1Loss`` between ``F.normalize(teacher)`` and
    ``F.normalize(projection_head(student))`` over the tokens of the visible patches — equal to this
    with ``v = 1`` there, since every example keeps the same number of tokens. An example with no
    visible position has loss 0.

    Args:
      student_features, teacher_features: ``[B, ..., D]`` of one shape (project the student first).
      visible: ``[B, ...]`` (the positions' shape, without the channel axis), 1/True where compared.
      distance: ``"l1"`` (official) or ``"l2"``.
      normalize: ``l2``-normalize both along the channel axis first (official, with a projection head).
    """
    check_choice("distance", distance, ("l1", "l2"))
    s_shape, t_shape = np.shape(student_features), np.shape(teacher_features)
    if s_shape != t_shape or len(s_shape) < 2:
        raise ValueError(
            f"student and teacher features must be [B, ..., D] of one shape, got student_features {s_shape} and "
            f"teacher_features {t_shape}"
        )
    if visible is not None and np.shape(visible) != s_shape[:-1]:
        raise ValueError(
            f"visible must have the features' positions shape {s_shape[:-1]}, got {np.shape(visible)}"
        )
    s, t = to_float(student_features), to_float(teacher_features)
    dtype = jnp.promote_types(s.dtype, t.dtype)
    s, t = s.astype(dtype), t.astype(dtype)
    if normalize:
        s, t = l2_normalize(s), l2_normalize(t)
    diff = s - t
    per_position = jnp.mean(jnp.abs(diff) if distance == "l1" else diff * diff, axis=-1)
    b = s_shape[0]
    per_position = per_position.reshape(b, -1)
    if visible is None:
        return jnp.mean(per_position, axis=-1)
    v = jnp.asarray(visible, dtype).reshape(b, -1)
    count = jnp.sum(v, axis=-1)
    total = jnp.sum(jnp.where(v > 0, per_position * v, 0.0), axis=-1)
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)
