"""The alpha-beta divergence as a method: one family holding KL, reverse KL and the beta divergences."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_number, check_temperature
from jaxkd.methods.base import Method, Weight, logit_method
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["alpha_beta_divergence"]


@register("alpha_beta_divergence", example="alpha=0.5, beta=0.5", paper='Cichocki, Cruces & Amari, *Generalized Alpha-Beta Divergences*, 2011', losses=('alpha_beta_divergence',), contract=LOGIT_ROLES)
def alpha_beta_divergence(
    *, alpha: float, beta: float, temperature: float = 1.0, student: str = "student", teacher: str = "teacher",
    weight: Weight = 1.0, name: str = "alpha_beta_divergence",
) -> Method:
    """Alpha-Beta divergence ``D_AB^(α,β)(p_T ‖ p_S)``, no ``T²`` (:func:`jaxkd.losses.alpha_beta_divergence`).

    Cichocki, Cruces & Amari, "Generalized Alpha-Beta Divergences and Their Application to Robust
    Nonnegative Matrix Factorization" (Entropy, 2011), with teacher ``P`` and student ``Q``; ``α = 1,
    β = 0`` is forward KL, ``α = 0, β = 1`` reverse KL. Registry name ``"alpha_beta_divergence"``.
    """
    check_number("alpha", alpha)
    check_number("beta", beta)
    check_temperature("temperature", temperature)
    return logit_method(
        name, losses.alpha_beta_divergence, student=student, teacher=teacher, weight=weight,
        temperature=temperature, alpha=alpha, beta=beta,
    )
