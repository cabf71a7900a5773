"""Forward KL as a method: the teacher-to-student KL without Hinton's temperature-squared factor."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_temperature
from jaxkd.methods.base import Method, Weight, logit_method
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["forward_kl"]


@register("forward_kl", paper="forward KL (Hinton et al. 2015 without T²; GKD's β = 0)", losses=('forward_kl',), contract=LOGIT_ROLES)
def forward_kl(
    *, temperature: float = 1.0, student: str = "student", teacher: str = "teacher", weight: Weight = 1.0,
    name: str = "forward_kl",
) -> Method:
    """Forward KL ``KL(p_T ‖ p_S)`` at temperature ``T``, without ``T²`` (:func:`jaxkd.losses.forward_kl`).

    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015); GKD's ``β = 0``
    (Agarwal et al., ICLR 2024). Registry name ``"forward_kl"``.
    """
    check_temperature("temperature", temperature)
    return logit_method(name, losses.forward_kl, student=student, teacher=teacher, weight=weight,
                        temperature=temperature)
