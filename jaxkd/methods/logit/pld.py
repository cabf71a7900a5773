"""Plackett-Luce distillation as a method."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_temperature
from jaxkd.methods.base import Method, Weight, logit_roles_method
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["pld"]


@register("pld", paper="Bassam, Zhu & Bian, *Choice-Theoretic List-Wise KD (Plackett–Luce)*, 2025",
          losses=("pld",), contract=LOGIT_ROLES)
def pld(
    *, teacher_temperature: float = 1.0, student: str = "student", teacher: str = "teacher", weight: Weight = 1.0,
    name: str = "pld",
) -> Method:
    """Plackett-Luce distillation (:func:`jaxkd.losses.pld`); it replaces CE + KD, so use it alone.

    Bassam, Zhu & Bian, "PLD: A Choice-Theoretic List-Wise Knowledge Distillation", 2025.
    ``student``/``teacher`` name the participants in the two roles, as in :func:`~jaxkd.methods.kd`
    (the teacher's logits are a gradient-stopped target).
    """
    check_temperature("teacher_temperature", teacher_temperature)
    return logit_roles_method(
        name,
        lambda zs, zt, inputs, rng: losses.pld(
            zs, zt, inputs.labels(name), teacher_temperature=teacher_temperature, mask=inputs.label_mask
        ),
        student=student, teacher=teacher, weight=weight, needs_labels=True,
    )
