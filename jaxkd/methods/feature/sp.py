"""Similarity-preserving KD as a method: the batch's Gram matrices of a feature map."""

from __future__ import annotations

from typing import Sequence

from jaxkd import losses
from jaxkd.methods.base import Method, Weight
from jaxkd.methods.features import feature_method
from jaxkd.methods.registry import register

__all__ = ["sp"]


@register("sp", inputs="feature_maps", paper="Tung & Mori, *Similarity-Preserving Knowledge Distillation*, ICCV 2019", losses=("sp",))
def sp(
    *,
    student_features: str | Sequence[str] = "stage3",
    teacher_features: str | Sequence[str] | None = None,
    weight: Weight = 1.0,
    name: str = "sp",
) -> Method:
    """Similarity-preserving KD (:func:`jaxkd.losses.sp`), summed over the feature pairs.

    Tung & Mori, ICCV 2019. The default is RepDistiller's: the last feature map (``feat[-2]``, the CIFAR
    ResNets' ``stage3``); the teacher's features default to the student's names. The Gram matrices couple
    the examples: under a sharded batch they are the global batch's (XLA gathers the features), and a
    padded batch's ``mask`` removes the padding from every relation. RepDistiller's CIFAR setting is
    ``ce + 3000 * sp``. Metrics: the term of each pair (when there are several), named by the student
    feature.
    """
    return feature_method(
        name, losses.sp, student_features=student_features, teacher_features=teacher_features, weight=weight,
    )
