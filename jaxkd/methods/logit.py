"""Method transforms over class logits: label cross-entropy and Hinton KD."""

from __future__ import annotations

import jax

from jaxkd import losses
from jaxkd.losses._core import check_in_range, check_positive
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


def ce(*, label_smoothing: float = 0.0, weight: Weight = 1.0, label_key: str = "label", name: str = "ce") -> Method:
    """Cross-entropy of the student's logits with ``batch[label_key]`` (:func:`jaxkd.losses.cross_entropy`)."""
    check_in_range("label_smoothing", label_smoothing, 0.0, 1.0)

    def loss(vars: MethodVars, inputs: LossInputs, rng: jax.Array):
        del rng
        labels = require(inputs.batch, label_key, method=name)
        value = losses.cross_entropy(
            inputs.student.logits, labels, label_smoothing=label_smoothing, mask=example_mask(inputs.batch)
        )
        return value, LossAux({}, vars.state)

    return Method(name=name, loss=loss, weight=weight, batch_keys=(label_key,))


def kd(*, temperature: float = 4.0, weight: Weight = 1.0, name: str = "kd") -> Method:
    """Hinton KD: ``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))`` (:func:`jaxkd.losses.kd`).

    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015.
    """
    check_positive("temperature", temperature)

    def loss(vars: MethodVars, inputs: LossInputs, rng: jax.Array):
        del rng
        teacher = require_teacher(inputs, method=name)
        value = losses.kd(
            inputs.student.logits,
            jax.lax.stop_gradient(teacher.logits),
            temperature=temperature,
            mask=example_mask(inputs.batch),
        )
        return value, LossAux({}, vars.state)

    return Method(name=name, loss=loss, weight=weight, needs_teacher=True)
