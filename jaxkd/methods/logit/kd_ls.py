"""KD with logit standardization as a method."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_temperature
from jaxkd.methods.base import Method, Weight, logit_method
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["kd_ls"]


@register(
    "kd_ls",
    paper="Sun et al., *Logit Standardization in Knowledge Distillation*, CVPR 2024 (also `dkd(standardize=True)`)",
    losses=("kd_ls", "standardize_logits"),
    contract=LOGIT_ROLES,
)
def kd_ls(
    *, temperature: float = 2.0, student: str = "student", teacher: str = "teacher", weight: Weight = 1.0,
    name: str = "kd_ls",
) -> Method:
    """KD with logit standardization: ``τ²·KL(sm(Z(z_t)/τ) ‖ sm(Z(z_s)/τ))`` (:func:`jaxkd.losses.kd_ls`).

    Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024. The official CIFAR-100 runs
    use ``τ = 2`` and a KD weight of 9 with CE weight 0.1: ``0.1 * ce + 9 * kd_ls(temperature=2)``.
    """
    check_temperature("temperature", temperature)
    return logit_method(name, losses.kd_ls, student=student, teacher=teacher, weight=weight, temperature=temperature)
