"""Activation-boundary distillation as a method (``activation_boundary``; RepDistiller calls it ``abound``, and
``alpha_beta_divergence`` is the alpha-beta divergence): the student's pre-ReLU maps, through connectors, learn the teacher's activation
patterns — in RepDistiller a first, initialization stage before training on the labels."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from jaxkd import losses
from jaxkd.checks import check_nonnegative
from jaxkd.methods.base import Method, Weight
from jaxkd.methods.feature.connectors import conv_regressor_between
from jaxkd.methods.features import feature_method
from jaxkd.methods.registry import register

__all__ = ["activation_boundary", "activation_boundary_connector"]


class _Identity(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool):
        del train
        return x


def activation_boundary_connector(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """RepDistiller's AB ``Connector`` (``models/util.py``) for one NHWC pair: the identity when the
    channels and the height agree, else :class:`~jaxkd.methods.feature.connectors.ConvRegressor` without ReLU
    (convolution + BatchNorm), whose output is a pre-activation like the teacher's."""
    if len(student_shape) == 4 and len(teacher_shape) == 4 and (
        student_shape[-1] == teacher_shape[-1] and student_shape[1] == teacher_shape[1]
    ):
        return _Identity()
    return conv_regressor_between(student_shape, teacher_shape, use_relu=False)


@register(
    "activation_boundary", inputs="feature_maps",
    paper="Heo, Lee, Yun & Choi, *Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden "
    "Neurons*, AAAI 2019",
    losses=("activation_boundary",),
)
def activation_boundary(
    *,
    student_features: Sequence[str] = ("stage1_preact", "stage2_preact", "stage3_preact"),
    teacher_features: Sequence[str] | None = None,
    margin: float = 1.0,
    pair_weights: Sequence[float] | None = None,
    weight: Weight = 1.0,
    name: str = "activation_boundary",
) -> Method:
    """Activation-boundary distillation (:func:`jaxkd.losses.activation_boundary`), summed over the
    feature pairs: ``Σ_j w_j · mean_b AB(connector_j(s_j), t_j)``.

    Heo et al., AAAI 2019, as RepDistiller runs it (``--distill abound``): the pre-ReLU outputs of every
    stage (``feat[1:-1]`` with ``preact=True``: ``stage1_preact`` … ``stage3_preact``), a connector per
    pair (:func:`activation_boundary_connector`, trained with the student), margin 1, and RepDistiller's layer weights
    ``w_j = 3/1000 · 2^(j−n+1)`` (``0.00075, 0.0015, 0.003`` for three pairs; ``pair_weights`` overrides
    them).

    **Two stages.** RepDistiller uses AB only to initialize the student: ``init_epochs = 30`` epochs of
    this loss alone (student feature layers + connectors, a separate SGD optimizer), then 240 epochs of
    cross-entropy alone (``-a 0 -b 1`` with AB's term 0 in that stage; the connectors are dropped). In one
    train state that is::

        until(n) * activation_boundary + after(n) * ce      # n = 30 epochs' steps

    Differences from RepDistiller: one optimizer serves both stages (its momentum carries across the
    boundary and the learning-rate schedule spans both; RepDistiller restarts SGD with a fresh schedule for
    the 240 epochs), and the classifier — which gets no gradient in the first stage here or there — still
    sees any weight decay the optimizer applies. Metrics: the term of each pair, named by the student
    feature.
    """
    check_nonnegative("margin", margin)
    names = (student_features,) if isinstance(student_features, str) else tuple(student_features)
    if pair_weights is None:
        n = len(names)
        pair_weights = tuple(3e-3 * 2.0 ** (j - n + 1) for j in range(n))
    return feature_method(
        name, losses.activation_boundary, student_features=student_features, teacher_features=teacher_features,
        connector=activation_boundary_connector, pair_weights=pair_weights, weight=weight, margin=margin,
    )
