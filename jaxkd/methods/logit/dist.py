"""DIST as a method."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_nonnegative, check_temperature
from jaxkd.methods.base import Method, Weight, logit_roles_method
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["dist"]


@register("dist", paper="Huang et al., *Knowledge Distillation from A Stronger Teacher*, NeurIPS 2022",
          losses=("dist", "dist_terms"), contract=LOGIT_ROLES)
def dist(
    *, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0, student: str = "student",
    teacher: str = "teacher", weight: Weight = 1.0, name: str = "dist",
) -> Method:
    """DIST: ``τ²·(β·inter + γ·intra)`` Pearson-correlation matching (:func:`jaxkd.losses.dist`).

    Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022. The official recipes use
    ``ce + dist(beta=2, gamma=2, temperature=4)`` on CIFAR-100 and ``temperature=1`` on ImageNet.
    Metrics: ``inter`` and ``intra`` (before ``β``, ``γ``, ``τ²``). ``student``/``teacher`` name the participants in the two roles, as in :func:`~jaxkd.methods.kd`
    (the teacher's logits are a gradient-stopped target).
    """
    check_temperature("temperature", temperature)
    check_nonnegative("beta", beta)
    check_nonnegative("gamma", gamma)

    def compute(zs, zt, inputs, rng):
        inter, intra = losses.dist_terms(zs, zt, temperature=temperature, mask=inputs.example_mask)
        return temperature**2 * (beta * inter + gamma * intra), {"inter": inter, "intra": intra}

    return logit_roles_method(name, compute, student=student, teacher=teacher, weight=weight)
