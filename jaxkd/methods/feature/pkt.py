"""Probabilistic knowledge transfer as a method: on the pooled embeddings."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_positive
from jaxkd.methods.base import Method, Weight
from jaxkd.methods.features import feature_method
from jaxkd.methods.registry import register

__all__ = ["pkt"]


@register(
    "pkt",
    paper="Passalis & Tefas, *Learning Deep Representations with Probabilistic Knowledge Transfer*, ECCV 2018",
    losses=("pkt",),
)
def pkt(
    *,
    student_feature: str = "pooled",
    teacher_feature: str | None = None,
    eps: float = 1e-7,
    weight: Weight = 1.0,
    name: str = "pkt",
) -> Method:
    """Probabilistic knowledge transfer (:func:`jaxkd.losses.pkt`) between the student's and the teacher's
    embeddings (default: the pooled ones, RepDistiller's ``feat[-1]``; the dimensions may differ).

    Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018.
    A relational loss: with a padded batch only the valid examples enter the similarities. RepDistiller's
    CIFAR setting is ``ce + 30000 * pkt``.
    """
    check_positive("eps", eps)
    return feature_method(
        name, losses.pkt, student_features=student_feature, teacher_features=teacher_feature, weight=weight, eps=eps,
    )
