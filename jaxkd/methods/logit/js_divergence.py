"""Jensen–Shannon divergence as a method: the symmetric divergence through the two distributions' mean."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_temperature
from jaxkd.methods.base import Method, Weight, logit_method
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["js_divergence"]


@register("js_divergence", paper='Jensen–Shannon divergence (Lin, *Divergence Measures Based on the Shannon Entropy*, 1991)', losses=('js_divergence',), contract=LOGIT_ROLES)
def js_divergence(
    *, temperature: float = 1.0, student: str = "student", teacher: str = "teacher", weight: Weight = 1.0,
    name: str = "js_divergence",
) -> Method:
    """Jensen–Shannon divergence ``½KL(p_T‖m) + ½KL(p_S‖m)``, ``m = ½(p_T + p_S)``, without ``T²``.

    Lin, "Divergence Measures Based on the Shannon Entropy" (1991) (:func:`jaxkd.losses.js_divergence`).
    Registry name ``"js_divergence"``.
    """
    check_temperature("temperature", temperature)
    return logit_method(name, losses.js_divergence, student=student, teacher=teacher, weight=weight,
                        temperature=temperature)
