"""Relational KD as a method: distances and angles between the batch's embeddings."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_nonnegative
from jaxkd.methods.base import Method, Weight, stateless_method
from jaxkd.methods import features
from jaxkd.methods.registry import register

__all__ = ["rkd"]


@register(
    "rkd",
    paper="Park, Kim, Lu & Cho, *Relational Knowledge Distillation*, CVPR 2019",
    losses=("rkd", "rkd_terms"),
)
def rkd(
    *,
    student_feature: str = "pooled",
    teacher_feature: str | None = None,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    weight: Weight = 1.0,
    name: str = "rkd",
) -> Method:
    """Relational KD (:func:`jaxkd.losses.rkd`): ``λ_D · L_RKD-D + λ_A · L_RKD-A`` on an embedding.

    Park et al., CVPR 2019. Defaults are RepDistiller's (the same as the authors' code): the pooled
    embedding (``feat[-1]``, ``pooled``), ``λ_D = 25``, ``λ_A = 50``; RepDistiller's CIFAR setting is
    ``ce + rkd``. The relations are over the global batch under sharding; a padded batch's ``mask``
    removes the padding from every pair and triplet. Metrics: ``distance`` and ``angle`` (unweighted).
    """
    check_nonnegative("distance_weight", distance_weight)
    check_nonnegative("angle_weight", angle_weight)
    s_name = student_feature
    t_name = s_name if teacher_feature is None else teacher_feature

    def compute(inputs, rng):
        s = features.student_feature(inputs, s_name, method=name)
        t = features.teacher_feature(inputs, t_name, method=name)
        distance, angle = losses.rkd_terms(s, t, mask=inputs.example_mask)
        return distance_weight * distance + angle_weight * angle, {"distance": distance, "angle": angle}

    return stateless_method(name, compute, weight=weight, participants=("teacher",))
