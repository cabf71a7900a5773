"""DistiLLM's skew reverse KL as a method: the student against a mixture of student and teacher."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_in_range, check_temperature
from jaxkd.methods.base import Method, Weight, logit_method
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["skew_reverse_kl"]


@register("skew_reverse_kl", paper='Ko et al., *DistiLLM*, ICML 2024 (skew reverse KL)', losses=('skew_reverse_kl',), contract=LOGIT_ROLES)
def skew_reverse_kl(
    *, alpha: float = 0.1, temperature: float = 1.0, student: str = "student", teacher: str = "teacher",
    weight: Weight = 1.0, name: str = "skew_reverse_kl",
) -> Method:
    """DistiLLM skew reverse KL ``KL(p_S ‖ (1−α) p_T + α p_S)``, without ``T²``; see
    :func:`jaxkd.losses.skew_reverse_kl`.

    Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models" (ICML 2024), default
    ``α = 0.1``. Registry name ``"skew_reverse_kl"``.
    """
    check_in_range("alpha", alpha, 0.0, 1.0)
    check_temperature("temperature", temperature)
    return logit_method(name, losses.skew_reverse_kl, student=student, teacher=teacher, weight=weight,
                        temperature=temperature, alpha=alpha)
