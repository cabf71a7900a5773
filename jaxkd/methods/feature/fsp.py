"""FSP as a method: the FSP matrices of consecutive features."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight
from jaxkd.methods.features import student_feature, teacher_feature
from jaxkd.methods.registry import register

__all__ = ["fsp"]


def consecutive_pairs_method(
    name: str,
    loss_fn: Callable,
    *,
    student_features: Sequence[str],
    teacher_features: Sequence[str] | None,
    weight: Weight,
    **hyperparameters,
) -> Method:
    """``Σ_j loss_fn(f_s^j, f_s^{j+1}, f_t^j, f_t^{j+1})`` over consecutive features (FSP, KD-SVD).

    Metrics: each pair's term, ``"<lower>-<upper>"`` by the student's feature names. The shapes are
    checked when the train state is created (``init`` traces the loss on the abstract features).
    """
    s_names = (student_features,) if isinstance(student_features, str) else tuple(student_features)
    t_names = s_names if teacher_features is None else (
        (teacher_features,) if isinstance(teacher_features, str) else tuple(teacher_features))
    if len(s_names) < 2 or not all(isinstance(n, str) and n for n in s_names):
        raise ValueError(f"{name} relates consecutive features: student_features needs at least 2 names, got {student_features!r}")
    if len(t_names) != len(s_names) or not all(isinstance(n, str) and n for n in t_names):
        raise ValueError(f"{name}: {len(s_names)} student features {s_names} but teacher features {t_names!r}")

    def terms(inputs: LossInputs):
        s = [student_feature(inputs, n, method=name) for n in s_names]
        t = [teacher_feature(inputs, n, method=name) for n in t_names]
        metrics = {}
        for j in range(len(s) - 1):
            metrics[f"{s_names[j]}-{s_names[j + 1]}"] = jnp.asarray(
                loss_fn(s[j], s[j + 1], t[j], t[j + 1], mask=inputs.example_mask, **hyperparameters), jnp.float32)
        return metrics

    def init(rng, inputs: LossInputs) -> MethodVars:
        del rng
        s = [student_feature(inputs, n, method=name) for n in s_names]
        t = [teacher_feature(inputs, n, method=name) for n in t_names]
        for j in range(len(s) - 1):  # shape errors now, naming the features, rather than in the first step
            try:
                jax.eval_shape(lambda *f: loss_fn(*f, **hyperparameters), s[j], s[j + 1], t[j], t[j + 1])
            except ValueError as e:
                raise ValueError(f"{name}: features {s_names[j]!r}, {s_names[j + 1]!r}: {e}") from None
        return MethodVars()

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        metrics = terms(inputs)
        return sum(metrics.values()), LossAux(metrics, vars.state)

    return Method(name=name, loss=loss, init=init, weight=weight, needs=Needs(participants=("teacher",)))


@register(
    "fsp", inputs="feature_maps", same_width=True,
    paper="Yim, Joo, Bae & Kim, *A Gift from Knowledge Distillation: Fast Optimization, Network Minimization "
    "and Transfer Learning*, CVPR 2017",
    losses=("fsp",),
)
def fsp(
    *,
    student_features: Sequence[str] = ("stem", "stage1", "stage2", "stage3"),
    teacher_features: Sequence[str] | None = None,
    weight: Weight = 1.0,
    name: str = "fsp",
) -> Method:
    """FSP (:func:`jaxkd.losses.fsp`) summed over consecutive pairs of features.

    Yim, Joo, Bae & Kim, CVPR 2017. The defaults are RepDistiller's ``feat[:-1]`` on the CIFAR ResNets
    (stem and every stage), whose student and teacher channels agree layer by layer (resnet32x4 and
    resnet8x4; resnet20 and resnet8). The paper and RepDistiller use FSP as a first stage only: the
    student's feature layers are trained on FSP alone (RepDistiller: 30 epochs, weight 1), then the
    student is trained on the labels alone (``ce``; RepDistiller's ``-b 50`` multiplies a zero term).
    One run with stage weights::

        "until(n) * fsp + after(n) * ce"

    In RepDistiller's first stage the student's BatchNorm layers are in eval mode; here they train.
    """
    return consecutive_pairs_method(
        name, losses.fsp, student_features=student_features, teacher_features=teacher_features, weight=weight,
    )
