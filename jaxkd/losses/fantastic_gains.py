"""Data-partitioned KD of Fantastic Gains (Roth et al., ICLR 2024).

Roth, Thede, Koepke, Vinyals, Hénaff & Akata, "Fantastic Gains and Where to Find Them: On the Existence
and Prospect of General Knowledge Transfer between Any Pretrained Model", ICLR 2024. Checked against
the official code (ExplainableML/FantasticGains ``main_distillation.py``, KL+DP), ``shared/FORMULAS.md``
§13.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd.losses._core import Array, Reduction, check_labels, check_same_logits, reduce_loss
from jaxkd.losses.divergences import kl_per_example


def teacher_is_more_confident(teacher_logits: Array, initial_logits: Array, labels: Array | None = None) -> Array:
    """Per example: does the teacher beat the frozen initial student (softmax at T = 1)?

    With labels (the supervised criterion): ``softmax(z_t)[y] > softmax(z_0)[y]`` (strict). Without
    (``most-conf_u``): ``max softmax(z_t) > max softmax(z_0)``.
    """
    check_same_logits(initial_logits, teacher_logits)
    p_t = jax.nn.softmax(jnp.asarray(teacher_logits, jnp.float32), axis=-1)
    p_0 = jax.nn.softmax(jnp.asarray(initial_logits, jnp.float32), axis=-1)
    if labels is None:
        return jnp.max(p_t, -1) > jnp.max(p_0, -1)
    check_labels(labels, teacher_logits)
    conf_t = jnp.take_along_axis(p_t, labels[..., None], axis=-1)[..., 0]
    conf_0 = jnp.take_along_axis(p_0, labels[..., None], axis=-1)[..., 0]
    return conf_t > conf_0


def data_partitioned_kd(
    student_logits: Array,
    teacher_logits: Array,
    initial_logits: Array,
    labels: Array | None = None,
    *,
    temperature: float = 1.0,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> tuple[Array, Array]:
    """KL+DP: ``T² · KL(softmax(z_tgt/T) ‖ softmax(z_s/T))`` with a per-example target.

    ``z_tgt`` is the teacher's logits where :func:`teacher_is_more_confident`, else the frozen initial
    student's — so the student only learns from the teacher where the teacher knows better, and is
    held to its own initial predictions elsewhere. Returns ``(loss, use_teacher)``. The official code
    also restricts the classes to the teacher's top-k with k = 1000 (all ImageNet classes); jaxkd keeps
    all classes.
    """
    use_teacher = teacher_is_more_confident(teacher_logits, initial_logits, labels)
    target = jnp.where(use_teacher[..., None], teacher_logits, initial_logits)
    per_example = temperature**2 * kl_per_example(target, student_logits, temperature=temperature)
    return reduce_loss(per_example, mask=mask, weights=weights, reduction=reduction), use_teacher

