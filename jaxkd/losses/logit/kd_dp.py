"""Data-partitioned KD, KL+DP (Roth, Thede, Koepke, Vinyals, Hénaff & Akata, "Fantastic Gains and Where to
Find Them: On the Existence and Prospect of General Knowledge Transfer between Any Pretrained Model",
ICLR 2024), checked against the official code (``ExplainableML/FantasticGains``,
``main_distillation.py``)."""

from __future__ import annotations

import jax.numpy as jnp

from jaxkd.checks import check_labels, check_same_logits, check_temperature
from jaxkd.losses.logit.classification import kd
from jaxkd.losses.core import Array, label_one_hot, log_softmax, per_example_loss, probs

__all__ = ["kd_dp", "teacher_is_more_confident"]


def _confidences(teacher_logits: Array, initial_logits: Array, labels: Array | None) -> tuple[Array, Array]:
    check_same_logits(initial_logits, teacher_logits)
    p_t, p_0 = probs(log_softmax(teacher_logits)), probs(log_softmax(initial_logits))
    if labels is None:
        return jnp.max(p_t, -1), jnp.max(p_0, -1)
    check_labels(labels, teacher_logits)
    gt = label_one_hot(labels, p_t.shape[-1])[0]
    return jnp.sum(jnp.where(gt, p_t, 0.0), -1), jnp.sum(jnp.where(gt, p_0, 0.0), -1)


def teacher_is_more_confident(teacher_logits: Array, initial_logits: Array, labels: Array | None = None) -> Array:
    """Per example: does the teacher beat the frozen initial student (softmax at T = 1)?

    With labels (the supervised criterion): ``softmax(z_t)[y] > softmax(z_0)[y]`` (strict). Without
    (``most-conf_u``): ``max softmax(z_t) > max softmax(z_0)``.
    """
    conf_teacher, conf_initial = _confidences(teacher_logits, initial_logits, labels)
    return conf_teacher > conf_initial


@per_example_loss
def kd_dp(
    student_logits: Array,
    teacher_logits: Array,
    initial_logits: Array,
    labels: Array | None = None,
    *,
    temperature: float = 1.0,
) -> Array:
    """KL+DP: ``T² · KL(softmax(z_tgt/T) ‖ softmax(z_s/T))`` per example, with a per-example target.

    ``z_tgt`` is the teacher's logits where :func:`teacher_is_more_confident`, else the frozen initial
    student's — so the student only learns from the teacher where the teacher knows better, and is held
    to its own initial predictions elsewhere. The official code also restricts the classes to the
    teacher's top-k with k = 1000 (all ImageNet classes); jaxkd keeps all classes. With labels, a label
    outside ``[0, C)`` gives NaN.
    """
    check_temperature("temperature", temperature)
    conf_teacher, conf_initial = _confidences(teacher_logits, initial_logits, labels)
    target = jnp.where((conf_teacher > conf_initial)[..., None], teacher_logits, initial_logits)
    value = kd(student_logits, target, temperature=temperature, reduction="none")
    # NaN confidences (NaN logits, a label out of range) make the choice undefined: NaN, not a silent pick.
    undefined = jnp.isnan(conf_teacher) | jnp.isnan(conf_initial)
    if labels is not None:
        undefined = undefined | ~label_one_hot(labels, jnp.shape(student_logits)[-1])[1]
    return jnp.where(undefined, jnp.nan, value)
