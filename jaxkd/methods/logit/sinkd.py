"""SinKD as a method."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_int, check_positive, check_temperature
from jaxkd.methods.base import Method, Weight, logit_method
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["sinkd"]


@register(
    "sinkd",
    paper="Cui et al., *SinKD: Sinkhorn Distance Minimization for KD*, LREC-COLING 2024",
    losses=("sinkd", "sinkhorn_plan"),
    status="supported (paper's loss; the released script never applies it)",
    contract=LOGIT_ROLES,
)
def sinkd(
    *, temperature: float = 2.0, epsilon: float = 0.1, iterations: int = 20, student: str = "student",
    teacher: str = "teacher", weight: Weight = 1.0, name: str = "sinkd",
) -> Method:
    """Batch-wise Sinkhorn distance between student and teacher predictions (:func:`jaxkd.losses.sinkd`).

    Cui et al., "SinKD: Sinkhorn Distance Minimization for Knowledge Distillation", LREC-COLING 2024.
    The paper adds it to CE and KL: ``0.2 * ce + 0.8 * kd(...) + beta * sinkd()``. The plan here has
    uniform ``1/B`` marginals; the official all-ones marginals make its value ``B`` times larger, so the
    official ``0.8 × 0.001`` corresponds to ``weight = 0.0008 · B`` (in a spec:
    ``0.0008 * batch_size * sinkd``).
    """
    check_temperature("temperature", temperature)
    check_positive("epsilon", epsilon)
    iterations = check_int("iterations", iterations, low=1)
    return logit_method(
        name, losses.sinkd, student=student, teacher=teacher, weight=weight, temperature=temperature,
        epsilon=epsilon, iterations=iterations,
    )
