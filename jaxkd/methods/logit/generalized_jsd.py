"""GKD's generalized Jensen–Shannon divergence as a method (β interpolates forward and reverse KL)."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_in_range, check_temperature
from jaxkd.methods.base import Method, Weight, logit_method
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["generalized_jsd"]


@register("generalized_jsd", paper='Agarwal et al., *On-Policy Distillation of Language Models* (GKD), ICLR 2024', losses=('generalized_jsd',), contract=LOGIT_ROLES)
def generalized_jsd(
    *, beta: float = 0.5, temperature: float = 1.0, student: str = "student", teacher: str = "teacher",
    weight: Weight = 1.0, name: str = "generalized_jsd",
) -> Method:
    """GKD's generalized JSD in TRL's convention, without ``T²`` (:func:`jaxkd.losses.generalized_jsd`).

    Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"
    (ICLR 2024): ``m = β p_T + (1−β) p_S``, ``β KL(p_T‖m) + (1−β) KL(p_S‖m)``; ``β = 0`` is forward KL,
    ``β = 1`` reverse KL (TRL's special cases). This is the loss only: GKD's on-policy student sampling
    (``λ``) is not part of it. Registry name ``"generalized_jsd"``.
    """
    check_in_range("beta", beta, 0.0, 1.0)
    check_temperature("temperature", temperature)
    return logit_method(name, losses.generalized_jsd, student=student, teacher=teacher, weight=weight,
                        temperature=temperature, beta=beta)
