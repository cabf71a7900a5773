"""KD-SVD as a method: relations between consecutive stages' leading singular vectors."""

from __future__ import annotations

from typing import Sequence

from jaxkd import losses
from jaxkd.checks import check_int
from jaxkd.methods.base import Method, Weight
from jaxkd.methods.feature.fsp import consecutive_pairs_method
from jaxkd.methods.registry import register

__all__ = ["kdsvd"]


@register(
    "kdsvd", inputs="feature_maps", same_width=True,
    paper="Lee, Kim & Song, *Self-supervised Knowledge Distillation Using Singular Value Decomposition*, ECCV 2018",
    losses=("kdsvd",),
)
def kdsvd(
    *,
    student_features: Sequence[str] = ("stage1", "stage2", "stage3"),
    teacher_features: Sequence[str] | None = None,
    k: int = 1,
    weight: Weight = 1.0,
    name: str = "kdsvd",
) -> Method:
    """KD-SVD (:func:`jaxkd.losses.kdsvd`) summed over consecutive pairs of features.

    Lee, Kim & Song, ECCV 2018. The defaults are RepDistiller's (``feat[1:-1]`` on the CIFAR ResNets,
    ``k = 1``; its CIFAR setting is ``ce + kdsvd``, ``-b 1``). The student's and the teacher's features
    must have the same channels layer by layer.
    """
    k = check_int("k", k, low=1)
    return consecutive_pairs_method(
        name, losses.kdsvd, student_features=student_features, teacher_features=teacher_features, weight=weight, k=k,
    )
