"""Normalized KD as a method."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_choice, check_nonnegative, check_temperature
from jaxkd.methods.base import Method, Weight, logit_roles_method
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["nkd"]


@register(
    "nkd",
    paper="Yang et al., *From KD to Self-KD: Normalized Loss and Customized Soft Labels*, ICCV 2023",
    losses=("nkd", "nkd_terms"),
    contract=LOGIT_ROLES,
)
def nkd(
    *, temperature: float = 1.0, gamma: float = 1.5, form: str = "ce", student: str = "student",
    teacher: str = "teacher", weight: Weight = 1.0, name: str = "nkd",
) -> Method:
    """Normalized KD: target ``−T_y log S_y`` + ``γλ²``·normalized non-target CE (:func:`jaxkd.losses.nkd`).

    Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation", ICCV 2023. Added to the
    label CE: ``ce + nkd(temperature=1, gamma=1.5)`` (ImageNet) or ``nkd(temperature=3, gamma=3.5)``
    (CIFAR-100). Metrics: ``target`` and ``nontarget``. ``student``/``teacher`` name the participants in the two roles, as in :func:`~jaxkd.methods.kd`
    (the teacher's logits are a gradient-stopped target).
    """
    check_temperature("temperature", temperature)
    check_nonnegative("gamma", gamma)
    check_choice("form", form, ("ce", "kl"))

    def compute(zs, zt, inputs, rng):
        target, nontarget = losses.nkd_terms(
            zs, zt, inputs.labels(name), temperature=temperature,
            gamma=gamma, form=form, mask=inputs.label_mask,
        )
        return target + nontarget, {"target": target, "nontarget": nontarget}

    return logit_roles_method(name, compute, student=student, teacher=teacher, weight=weight, needs_labels=True)
