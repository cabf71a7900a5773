"""Plackett-Luce distillation as a method."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_temperature
from jaxkd.methods.base import Method, Weight, stateless_method
from jaxkd.methods.registry import register

__all__ = ["pld"]


@register("pld", paper="Bassam, Zhu & Bian, *Choice-Theoretic List-Wise KD (Plackett–Luce)*, 2025",
          losses=("pld",))
def pld(*, teacher_temperature: float = 1.0, weight: Weight = 1.0, name: str = "pld") -> Method:
    """Plackett-Luce distillation (:func:`jaxkd.losses.pld`); it replaces CE + KD, so use it alone.

    Bassam, Zhu & Bian, "PLD: A Choice-Theoretic List-Wise Knowledge Distillation", 2025.
    """
    check_temperature("teacher_temperature", teacher_temperature)
    return stateless_method(
        name,
        lambda inputs, rng: losses.pld(
            inputs.student.logits, inputs.teacher.logits, inputs.labels(name),
            teacher_temperature=teacher_temperature, mask=inputs.label_mask,
        ),
        weight=weight, needs_labels=True,
    )
