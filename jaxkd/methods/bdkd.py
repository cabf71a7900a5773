"""BD-KD's student loss as a method."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_temperature
from jaxkd.methods.base import Method, Weight, stateless_method
from jaxkd.methods.registry import register

__all__ = ["bdkd"]


@register(
    "bdkd",
    paper="Amara et al., *BD-KD: Balancing the Divergences for Online KD*, 2022 (offline half)",
    losses=("bdkd", "bdkd_terms", "bdkd_weights"),
    status="from the paper's text",
)
def bdkd(*, temperature: float = 4.0, weight: Weight = 1.0, name: str = "bdkd") -> Method:
    """BD-KD's student loss: entropy-balanced forward + reverse KL (:func:`jaxkd.losses.bdkd`).

    Amara et al., "BD-KD: Balancing the Divergences for Online Knowledge Distillation", 2022. The
    per-example weighting is a documented assumption (only the abstract was readable). Metrics:
    ``forward`` and ``reverse`` (the weighted terms) and ``w_forward`` (the mean forward weight).
    """
    check_temperature("temperature", temperature)

    def compute(inputs, rng):
        zs, zt, mask = inputs.student.logits, inputs.teacher.logits, inputs.example_mask
        forward, reverse = losses.bdkd_terms(zs, zt, temperature=temperature, mask=mask)
        w_forward, _ = losses.bdkd_weights(zs, zt, temperature=temperature)
        metrics = {"forward": forward, "reverse": reverse, "w_forward": losses.reduce_loss(w_forward, mask=mask)}
        return forward + reverse, metrics

    return stateless_method(name, compute, weight=weight)
