"""Two-head students: a second classifier on the student's embedding, trained by the teacher.

The extra head's parameters are method parameters (stepped by the student's optimizer, saved in the
train state); the student model itself is unchanged.

* :func:`dho` — Dual-Head Optimization (Kang et al., "Simple yet Effective Semi-supervised Knowledge
  Distillation from Vision-Language Models via Dual-Head Optimization", 2025, arXiv 2505.07675):
  CE on the model's own head, KD on the extra head, and at inference the two heads' probabilities
  mixed (``predict``).
* :func:`dhkd` — Dual-Head Knowledge Distillation (Yang et al., "Dual-Head Knowledge Distillation:
  Enhancing Logits Utilization with an Auxiliary Head", 2024, arXiv 2411.08937): CE on the model's
  head, BinaryKL-Norm on the auxiliary head; inference uses the model's head only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.losses._core import check_in_range, check_positive
from jaxkd.methods.heads import head_apply, head_init
from jaxkd.methods.base import (
    LossAux,
    LossInputs,
    Method,
    MethodVars,
    Weight,
    example_mask,
    require,
    require_teacher,
)
from jaxkd.models.base import Outputs, get_feature


def _feature_and_classes(inputs: LossInputs, feature: str) -> tuple[int, int]:
    f = get_feature(inputs.student, feature, who="student")
    if f.ndim != 2:
        raise ValueError(f"the extra head reads a [batch, dim] feature; {feature!r} has shape {f.shape}")
    return f.shape[-1], inputs.student.logits.shape[-1]


def dho(
    *,
    temperature: float = 2.0,
    ce_weight: float = 0.5,
    kd_weight: float = 0.5,
    mix: float = 0.5,
    kd_head_temperature: float = 1.0,
    feature: str = "pooled",
    weight: Weight = 1.0,
    name: str = "dho",
) -> Method:
    """DHO: ``ce_weight·CE(z_ce, y) + kd_weight·T²·KL(softmax(z_t/T) ‖ softmax(z_kd/T))``.

    ``z_ce`` is the student's own logits; ``z_kd`` a linear head on ``feature``. Inference (``predict``):
    ``p = mix·softmax(z_ce) + (1 − mix)·softmax(z_kd / kd_head_temperature)``, returned as ``log p``.
    The official code grid-searches ``mix`` ∈ {0, 0.05, …, 1} and the head temperature ∈ {0.5 … 4} on
    validation data and weights 0.5/0.5 (``train_others.py``); these defaults use 0.5 and 1.0. It
    replaces ``ce + kd`` (don't chain another ``ce``). Metrics: ``ce``, ``kd``.
    """
    check_positive("temperature", temperature)
    check_positive("kd_head_temperature", kd_head_temperature)
    check_in_range("mix", mix, 0.0, 1.0)

    def init(rng: jax.Array, inputs: LossInputs) -> MethodVars:
        d, c = _feature_and_classes(inputs, feature)
        return MethodVars(params={"kd_head": head_init(rng, d, c, None)})

    def loss(vars: MethodVars, inputs: LossInputs, rng: jax.Array):
        del rng
        teacher = require_teacher(inputs, method=name)
        labels = require(inputs.batch, "label", method=name)
        mask = example_mask(inputs.batch)
        z_kd = head_apply(vars.params["kd_head"], get_feature(inputs.student, feature, who="student"))
        ce = losses.cross_entropy(inputs.student.logits, labels, mask=mask)
        kd = losses.kd(z_kd, jax.lax.stop_gradient(teacher.logits), temperature=temperature, mask=mask)
        return ce_weight * ce + kd_weight * kd, LossAux({"ce": ce, "kd": kd}, vars.state)

    def predict(vars: MethodVars, outputs: Outputs) -> jax.Array:
        z_kd = head_apply(vars.params["kd_head"], get_feature(outputs, feature, who="student"))
        p = mix * jax.nn.softmax(outputs.logits.astype(jnp.float32), -1) + (1 - mix) * jax.nn.softmax(
            z_kd / kd_head_temperature, -1
        )
        return jnp.log(p)

    return Method(name=name, loss=loss, init=init, weight=weight, needs_teacher=True,
                  batch_keys=("label",), predict=predict)


def dhkd(
    *,
    temperature: float = 2.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    hidden: int | None = None,
    feature: str = "pooled",
    weight: Weight = 1.0,
    name: str = "dhkd",
) -> Method:
    """Dual-Head KD: ``ce_weight·CE(z, y) + kd_weight·BinaryKL-Norm(z_aux, z_t; T)``.

    ``z`` is the student's own head (the only one used at inference); ``z_aux`` an auxiliary head on
    ``feature`` — linear (the official ImageNet setting) or, with ``hidden``, Linear → ReLU → Linear (the
    official CIFAR head also has dropout 0.1 and BatchNorm before the ReLU, left out here). The
    official CIFAR runs also project the KD gradient against the CE gradient (``--ga``); not done
    here. Official weights: 1 and 1 (CIFAR), 1 and 0.1 (ImageNet); T = 2. Metrics: ``ce``, ``bkl``.
    """
    check_positive("temperature", temperature)
    if hidden is not None and hidden <= 0:
        raise ValueError(f"hidden must be a positive width or None, got hidden={hidden!r}")

    def init(rng: jax.Array, inputs: LossInputs) -> MethodVars:
        d, c = _feature_and_classes(inputs, feature)
        return MethodVars(params={"aux_head": head_init(rng, d, c, hidden)})

    def loss(vars: MethodVars, inputs: LossInputs, rng: jax.Array):
        del rng
        teacher = require_teacher(inputs, method=name)
        labels = require(inputs.batch, "label", method=name)
        mask = example_mask(inputs.batch)
        z_aux = head_apply(vars.params["aux_head"], get_feature(inputs.student, feature, who="student"))
        ce = losses.cross_entropy(inputs.student.logits, labels, mask=mask)
        bkl = losses.binary_kl_norm(z_aux, jax.lax.stop_gradient(teacher.logits), temperature=temperature, mask=mask)
        return ce_weight * ce + kd_weight * bkl, LossAux({"ce": ce, "bkl": bkl}, vars.state)

    return Method(name=name, loss=loss, init=init, weight=weight, needs_teacher=True, batch_keys=("label",))
