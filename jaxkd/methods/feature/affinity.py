"""Affinity distillation (the AD half of KTAAD) as a method: the student's map through a trainable 3x3
convolution (:class:`jaxkd.methods.feature.kta.Adapter` without BN/ReLU) against the teacher's map."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.methods.base import Method, Weight
from jaxkd.methods.feature.kta import _PAPER, _STATUS, _adapter
from jaxkd.methods.features import feature_method
from jaxkd.methods.registry import register

__all__ = ["affinity"]


@register("affinity", inputs="feature_maps", paper=_PAPER, losses=("affinity",), status=_STATUS)
def affinity(
    *,
    student_features: str | tuple[str, ...] = "stage3",
    teacher_features: str | tuple[str, ...] | None = None,
    weight: Weight = 1.0,
    name: str = "affinity",
) -> Method:
    """Affinity distillation (:func:`jaxkd.losses.affinity`): the student's map through the affinity
    adapter (:class:`Adapter` without BN/ReLU: a 3x3 conv to the teacher's channels, a method parameter)
    against the teacher's map: per channel, the spatial self-affinity matrices are matched. Same target
    caveat as :func:`kta`.
    """
    return feature_method(name, losses.affinity, student_features=student_features,
                          teacher_features=teacher_features, connector=_adapter(False, name), weight=weight)
