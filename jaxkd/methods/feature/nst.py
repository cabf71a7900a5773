"""Neuron selectivity transfer as a method: MMD between channel distributions at every stage."""

from __future__ import annotations

from typing import Sequence

from jaxkd import losses
from jaxkd.checks import check_int, check_nonnegative
from jaxkd.methods.base import Method, Weight
from jaxkd.methods.features import feature_method
from jaxkd.methods.registry import register

__all__ = ["nst"]


@register(
    "nst", inputs="feature_maps",
    paper="Huang & Wang, *Like What You Like: Knowledge Distill via Neuron Selectivity Transfer*, 2017",
    losses=("nst",),
)
def nst(
    *,
    student_features: Sequence[str] = ("stage1", "stage2", "stage3"),
    teacher_features: Sequence[str] | None = None,
    degree: int = 2,
    constant: float = 0.0,
    weight: Weight = 1.0,
    name: str = "nst",
) -> Method:
    """Neuron selectivity transfer (:func:`jaxkd.losses.nst`, polynomial kernel ``(x·y + c)^d``), summed
    over the feature pairs.

    Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer", 2017. The
    default pairs are RepDistiller's ``feat[1:-1]`` on the CIFAR ResNets; RepDistiller's CIFAR setting is
    ``ce + 50 * nst``. Metrics: the term of each pair, named by the student feature.
    """
    degree = check_int("degree", degree, low=1)
    check_nonnegative("constant", constant)
    return feature_method(
        name, losses.nst, student_features=student_features, teacher_features=teacher_features, weight=weight,
        degree=degree, constant=constant,
    )
