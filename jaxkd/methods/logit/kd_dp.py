"""Fantastic Gains' KL+DP as a method: the frozen initial student lives in the method state."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_temperature
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight, check_roles
from jaxkd.methods.features import participant_variables
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["kd_dp"]


@register(
    "kd_dp",
    paper="Roth et al., *Fantastic Gains and Where to Find Them* (KL+DP), ICLR 2024",
    losses=("kd_dp", "teacher_is_more_confident"),
    status="supported (frozen initial student in method state)",
    contract=LOGIT_ROLES,
)
def kd_dp(
    *, temperature: float = 1.0, supervised: bool = True, student: str = "student", teacher: str = "teacher",
    weight: Weight = 1.0, name: str = "kd_dp",
) -> Method:
    """Data-partitioned KD, KL+DP (Roth et al., "Fantastic Gains and Where to Find Them…", ICLR 2024).

    At ``init`` the student's initial variables are copied into the method state (a frozen copy: it is
    never trained and is saved with the checkpoint). Each step runs that copy in eval mode and distils,
    per example, from whichever of teacher and frozen copy is more confident in the label
    (``supervised=True``, over the labeled examples) or overall (``False``, over every example); see
    :func:`jaxkd.losses.kd_dp`. Official default T = 1 and no CE (pure KL+DP). Metrics:
    ``teacher_fraction``.

    ``student``/``teacher`` name the participants in the two roles, as in :func:`~jaxkd.methods.kd`: the
    frozen initial copy is the one of the participant in the ``student`` role (``kd_dp(student="peer",
    teacher="student")`` partitions between the student's predictions and the peer's initial ones), and the
    teacher's logits are a gradient-stopped target.
    """
    check_temperature("temperature", temperature)
    check_roles(name, student, teacher)

    def init(rng, inputs: LossInputs) -> MethodVars:
        learner = participant_variables(inputs, student, method=name)
        frozen = jax.tree.map(lambda a: jnp.array(a, copy=True), learner)
        return MethodVars(state={"initial_student": frozen})

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        teacher_logits = inputs.target(teacher, method=name).logits
        frozen = jax.lax.stop_gradient(vars.state["initial_student"])
        learner = inputs.participant(student, method=name)
        initial_logits = jax.lax.stop_gradient(
            learner.model.apply(frozen, inputs.model_input_of(inputs.batch, student), train=False).logits
        )
        labels = inputs.labels(name) if supervised else None
        mask = inputs.label_mask if supervised else inputs.example_mask
        value = losses.kd_dp(
            inputs.output(student, method=name).logits, teacher_logits, initial_logits, labels,
            temperature=temperature, mask=mask,
        )
        use_teacher = losses.teacher_is_more_confident(teacher_logits, initial_logits, labels)
        return value, LossAux({"teacher_fraction": losses.reduce_loss(use_teacher, mask=mask)}, vars.state)

    return Method(name=name, loss=loss, init=init, weight=weight,
                  needs=Needs(trained=(student,), participants=(teacher,), labels=supervised))
