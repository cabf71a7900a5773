"""Reverse KL as a method: the mode-seeking KL from the student's distribution to the teacher's."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_temperature
from jaxkd.methods.base import Method, Weight, logit_method
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["reverse_kl"]


@register("reverse_kl", paper="reverse KL (Gu et al., *MiniLLM*, ICLR 2024, token level; GKD's β = 1)", losses=('reverse_kl',), contract=LOGIT_ROLES)
def reverse_kl(
    *, temperature: float = 1.0, student: str = "student", teacher: str = "teacher", weight: Weight = 1.0,
    name: str = "reverse_kl",
) -> Method:
    """Reverse KL ``KL(p_S ‖ p_T)``, without ``T²`` (:func:`jaxkd.losses.reverse_kl`).

    Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models" (ICLR 2024), as the exact
    token-level divergence (not MiniLLM's sequence-level policy gradient). Registry name ``"reverse_kl"``.
    """
    check_temperature("temperature", temperature)
    return logit_method(name, losses.reverse_kl, student=student, teacher=teacher, weight=weight,
                        temperature=temperature)
