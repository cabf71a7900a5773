"""Total variation distance as a method: half the L1 distance between the two distributions."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_temperature
from jaxkd.methods.base import Method, Weight, logit_method
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["total_variation"]


@register("total_variation", paper='total variation distance (Wen et al., *f-Divergence Minimization for Sequence-Level KD*, ACL 2023)', losses=('total_variation',), contract=LOGIT_ROLES)
def total_variation(
    *, temperature: float = 1.0, student: str = "student", teacher: str = "teacher", weight: Weight = 1.0,
    name: str = "total_variation",
) -> Method:
    """Total variation distance ``½ Σ |p_T − p_S|`` at temperature ``T``, no ``T²``; see
    :func:`jaxkd.losses.total_variation`.

    Wen et al., "f-Divergence Minimization for Sequence-Level Knowledge Distillation" (ACL 2023) use TVD
    among their f-divergences; DistiLLM ships it as a baseline. Registry name ``"total_variation"``.
    """
    check_temperature("temperature", temperature)
    return logit_method(name, losses.total_variation, student=student, teacher=teacher, weight=weight,
                        temperature=temperature)
