"""Attention transfer as a method: the spatial attention maps of every stage."""

from __future__ import annotations

from typing import Sequence

from jaxkd import losses
from jaxkd.checks import check_positive
from jaxkd.methods.base import Method, Weight
from jaxkd.methods.features import feature_method
from jaxkd.methods.registry import register

__all__ = ["at"]


@register(
    "at", inputs="feature_maps",
    paper="Zagoruyko & Komodakis, *Paying More Attention to Attention*, ICLR 2017",
    losses=("at",),
)
def at(
    *,
    student_features: Sequence[str] = ("stage1", "stage2", "stage3"),
    teacher_features: Sequence[str] | None = None,
    p: float = 2.0,
    weight: Weight = 1.0,
    name: str = "at",
) -> Method:
    """Attention transfer (:func:`jaxkd.losses.at`), summed over the feature pairs.

    Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
    Convolutional Neural Networks via Attention Transfer", ICLR 2017. The default pairs are
    RepDistiller's ``feat[1:-1]`` on the CIFAR ResNets (every stage's output); the teacher's features
    default to the student's names. RepDistiller's CIFAR setting is ``ce + 1000 * at``. Metrics: the
    term of each pair, named by the student feature.
    """
    check_positive("p", p)
    return feature_method(
        name, losses.at, student_features=student_features, teacher_features=teacher_features, weight=weight, p=p,
    )
