"""DistiLLM's skew KL as a method: the teacher against a mixture of teacher and student."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_in_range, check_temperature
from jaxkd.methods.base import Method, Weight, logit_method
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["skew_kl"]


@register("skew_kl", paper='Ko et al., *DistiLLM*, ICML 2024 (skew KL)', losses=('skew_kl',), contract=LOGIT_ROLES)
def skew_kl(
    *, alpha: float = 0.1, temperature: float = 1.0, student: str = "student", teacher: str = "teacher",
    weight: Weight = 1.0, name: str = "skew_kl",
) -> Method:
    """DistiLLM skew KL ``KL(p_T ‖ α p_T + (1−α) p_S)``, without ``T²`` (:func:`jaxkd.losses.skew_kl`).

    Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models" (ICML 2024), default
    ``α = 0.1`` as in its code. The KL form: it differs from DistiLLM's cross-entropy by the constant
    ``H(p_T)``, with the same student gradients. DistiLLM's adaptive off-policy sampling is not part of
    it. Registry name ``"skew_kl"``.
    """
    check_in_range("alpha", alpha, 0.0, 1.0)
    check_temperature("temperature", temperature)
    return logit_method(name, losses.skew_kl, student=student, teacher=teacher, weight=weight,
                        temperature=temperature, alpha=alpha)
