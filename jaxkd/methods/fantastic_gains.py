"""Fantastic Gains' KL+DP as a method: the frozen initial student lives in the method state."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd.losses._core import check_positive
from jaxkd.losses.fantastic_gains import data_partitioned_kd
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Weight, example_mask, require, require_teacher


def kd_dp(
    *,
    temperature: float = 1.0,
    supervised: bool = True,
    weight: Weight = 1.0,
    name: str = "kd_dp",
) -> Method:
    """Data-partitioned KD (Roth et al., "Fantastic Gains and Where to Find Them…", ICLR 2024).

    At ``init`` the student's initial variables are copied into the method state (a frozen copy: it is
    never trained and is saved with the checkpoint). Each step runs that copy in eval mode and distils,
    per example, from whichever of teacher and frozen copy is more confident in the label
    (``supervised=True``) or overall (``False``); see :func:`jaxkd.losses.fantastic_gains.data_partitioned_kd`.
    Official default T = 1 and no CE (pure KL+DP). Metrics: ``teacher_fraction``.
    """
    check_positive("temperature", temperature)

    def init(rng: jax.Array, inputs: LossInputs) -> MethodVars:
        del rng
        frozen = jax.tree.map(lambda a: jnp.array(a, copy=True), inputs.student_variables)
        return MethodVars(state={"initial_student": frozen})

    def loss(vars: MethodVars, inputs: LossInputs, rng: jax.Array):
        del rng
        teacher = require_teacher(inputs, method=name)
        labels = require(inputs.batch, "label", method=name) if supervised else None
        frozen = jax.lax.stop_gradient(vars.state["initial_student"])
        initial_logits = inputs.student_model.apply(frozen, inputs.model_input, train=False).logits
        mask = example_mask(inputs.batch)
        value, use_teacher = data_partitioned_kd(
            inputs.student.logits, jax.lax.stop_gradient(teacher.logits), jax.lax.stop_gradient(initial_logits),
            labels, temperature=temperature, mask=mask,
        )
        valid = jnp.ones(use_teacher.shape) if mask is None else jnp.asarray(mask, jnp.float32)
        fraction = jnp.sum(use_teacher * valid) / jnp.maximum(jnp.sum(valid), 1.0)
        return value, LossAux({"teacher_fraction": fraction}, vars.state)

    return Method(
        name=name, loss=loss, init=init, weight=weight, needs_teacher=True,
        batch_keys=("label",) if supervised else (),
    )
