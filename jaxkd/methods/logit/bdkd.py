"""BD-KD's student loss as a method."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_temperature
from jaxkd.methods.base import Method, Weight, logit_roles_method
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["bdkd"]


@register(
    "bdkd",
    paper="Amara et al., *BD-KD: Balancing the Divergences for Online KD*, 2022 (offline half)",
    losses=("bdkd", "bdkd_terms", "bdkd_weights"),
    status="from the paper's text",
    contract=LOGIT_ROLES,
)
def bdkd(
    *, temperature: float = 4.0, student: str = "student", teacher: str = "teacher", weight: Weight = 1.0,
    name: str = "bdkd",
) -> Method:
    """BD-KD's student loss: entropy-balanced forward + reverse KL (:func:`jaxkd.losses.bdkd`).

    Amara et al., "BD-KD: Balancing the Divergences for Online Knowledge Distillation", 2022. The
    per-example weighting is a documented assumption (only the abstract was readable). Metrics:
    ``forward`` and ``reverse`` (the weighted terms) and ``w_forward`` (the mean forward weight).
    """
    check_temperature("temperature", temperature)
    return logit_roles_method(
        name, lambda zs, zt, inputs, rng: balanced_divergences(zs, zt, inputs.example_mask, temperature),
        student=student, teacher=teacher, weight=weight,
    )


def balanced_divergences(zs, zt, mask, temperature):
    forward, reverse = losses.bdkd_terms(zs, zt, temperature=temperature, mask=mask)
    w_forward, _ = losses.bdkd_weights(zs, zt, temperature=temperature)
    metrics = {"forward": forward, "reverse": reverse, "w_forward": losses.reduce_loss(w_forward, mask=mask)}
    return forward + reverse, metrics
