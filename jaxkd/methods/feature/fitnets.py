"""FitNets as a method: a regressor maps the student's guided layer onto the teacher's hint layer."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.methods.base import Method, Weight
from jaxkd.methods.feature.connectors import connector_between
from jaxkd.methods.features import feature_method
from jaxkd.methods.registry import register

__all__ = ["fitnets"]


@register(
    "fitnets", inputs="feature_maps",
    paper="Romero et al., *FitNets: Hints for Thin Deep Nets*, ICLR 2015",
    losses=("fitnets",),
)
def fitnets(
    *,
    student_feature: str = "stage2",
    teacher_feature: str = "stage2",
    use_relu: bool = True,
    weight: Weight = 1.0,
    name: str = "fitnets",
) -> Method:
    """FitNets' hint loss (:func:`jaxkd.losses.fitnets`): the MSE between ``r(f_s)`` and the teacher's
    hint ``f_t``, where ``r`` is a trainable regressor trained with the student.

    Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015.
    ``r`` is :func:`jaxkd.methods.feature.connectors.connector_between` (RepDistiller's ``ConvReg`` for maps:
    conv, BatchNorm and, with ``use_relu``, ReLU; a linear map for embeddings). The default hint is
    RepDistiller's ``--hint_layer 2`` on the CIFAR ResNets, ``stage2``.

    RepDistiller trains it in one stage, ``ce + 100 * fitnets``. The paper's recipe is two stages: first
    the student up to the guided layer (and ``r``) is trained on the hint alone, then the whole student
    with KD. Stage weights make that one run::

        until(n) * fitnets() + after(n) * (ce() + kd(temperature=4))   # or the spec
        "until(n) * fitnets + after(n) * ce + after(n) * kd(temperature=4)"

    In the first ``n`` steps only the layers up to ``student_feature`` (and ``r``) receive gradients from
    the loss; the layers above it are still moved by an optimizer's weight decay or momentum, which the
    paper's separate stages would not do.
    """
    if not isinstance(use_relu, bool):
        raise ValueError(f"use_relu must be a bool, got use_relu={use_relu!r}")
    return feature_method(
        name, losses.fitnets, student_features=student_feature, teacher_features=teacher_feature,
        connector=lambda s, t: connector_between(s, t, use_relu=use_relu), weight=weight,
    )
