"""Hinton KD as a method: the temperature-scaled KL from a teacher's softened predictions, in any roles."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_temperature
from jaxkd.methods.base import Method, Weight, logit_method
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["kd"]


@register("kd", paper="Hinton, Vinyals & Dean, *Distilling the Knowledge in a Neural Network*, 2015",
          losses=("kd",), contract=LOGIT_ROLES)
def kd(
    *, temperature: float = 4.0, student: str = "student", teacher: str = "teacher", weight: Weight = 1.0,
    name: str = "kd",
) -> Method:
    """Hinton KD: ``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))`` (:func:`jaxkd.losses.kd`).

    ``student``/``teacher`` name the participants in the two roles (default: the student learns from the
    teacher); the target is gradient-stopped, so ``kd(student="peer", teacher="student")`` trains only the
    peer."""
    check_temperature("temperature", temperature)
    return logit_method(name, losses.kd, weight=weight, temperature=temperature, student=student, teacher=teacher)
