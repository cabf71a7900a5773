"""Dual-Head KD as a method: an auxiliary head on the student's embedding, trained by BinaryKL-Norm."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_int, check_temperature
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight, check_roles
from jaxkd.methods.heads import feature_head, feature_head_init
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["dhkd"]


@register(
    "dhkd",
    paper="Yang et al., *Dual-Head Knowledge Distillation*, 2024",
    losses=("dhkd", "dhkd_terms", "binary_kl_norm"),
    status="supported (without the official gradient alignment)",
    contract=LOGIT_ROLES,
)
def dhkd(
    *,
    temperature: float = 2.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    hidden: int | None = None,
    feature: str = "pooled",
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "dhkd",
) -> Method:
    """Dual-Head KD (:func:`jaxkd.losses.dhkd`): ``ce_weight·CE(z, y) + kd_weight·BinaryKL-Norm(z_aux, z_t; T)``.

    Yang et al., "Dual-Head Knowledge Distillation: Enhancing Logits Utilization with an Auxiliary Head",
    2024. ``z`` is the student's own head (the only one used at inference); ``z_aux`` an auxiliary head on
    ``feature`` — linear (the official ImageNet setting) or, with ``hidden``, Linear → ReLU → Linear (the
    official CIFAR head also has dropout 0.1 and BatchNorm before the ReLU, left out here). The official
    CIFAR runs also project the KD gradient against the CE gradient (``--ga``); not done here. Official
    weights: 1 and 1 (CIFAR), 1 and 0.1 (ImageNet); T = 2. Metrics: ``ce``, ``bkl``.

    ``student``/``teacher`` name the participants in the two roles, as in :func:`~jaxkd.methods.kd`: the
    auxiliary head reads the features of the participant in the ``student`` role, whose own logits take the
    CE term, and the teacher's logits are a gradient-stopped target.
    """
    check_roles(name, student, teacher)
    check_temperature("temperature", temperature)
    if hidden is not None:
        hidden = check_int("hidden", hidden, low=1)

    def init(rng, inputs: LossInputs) -> MethodVars:
        learner = inputs.output(student, method=name)
        return MethodVars(params={"aux_head": feature_head_init(rng, learner, feature, hidden)})

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        learner, target = inputs.output(student, method=name), inputs.target(teacher, method=name)
        ce, bkl = losses.dhkd_terms(
            learner.logits, feature_head(vars.params["aux_head"], learner, feature), target.logits,
            inputs.labels(name), temperature=temperature, mask=inputs.example_mask,
            labeled=inputs.labeled,
        )
        return ce_weight * ce + kd_weight * bkl, LossAux({"ce": ce, "bkl": bkl}, vars.state)

    return Method(name=name, loss=loss, init=init, weight=weight,
                  needs=Needs(trained=(student,), participants=(teacher,), labels=True))
