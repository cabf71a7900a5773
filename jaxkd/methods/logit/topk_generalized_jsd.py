"""GKD's generalized JSD over a top-k support (teacher's, student's or their union) with a tail bucket, as TRL does."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_choice, check_in_range, check_int, check_temperature
from jaxkd.methods.base import Method, Weight, logit_method
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["topk_generalized_jsd"]


def check_topk_arguments(k, tail: str, support: str, temperature: float, name: str) -> int:
    """The checks the top-k divergence methods share; returns ``k`` as an int."""
    if k is None:
        raise ValueError(f"{name} needs k (the number of top classes the support keeps from each side)")
    check_choice("tail", tail, ("bucket", "drop"))
    check_choice("support", support, ("auto", "teacher", "student", "union"))
    check_temperature("temperature", temperature)
    return check_int("k", k, low=1)


@register(
    "topk_generalized_jsd", example="k=2",
    paper="Agarwal et al., *On-Policy Distillation of Language Models* (GKD), ICLR 2024; TRL's top-k support with a tail bucket",
    losses=("topk_generalized_jsd",), contract=LOGIT_ROLES,
)
def topk_generalized_jsd(
    *, k: int | None = None, beta: float = 0.5, support: str = "auto", tail: str = "bucket",
    temperature: float = 1.0, student: str = "student", teacher: str = "teacher", weight: Weight = 1.0,
    name: str = "topk_generalized_jsd",
) -> Method:
    """Generalized JSD over a top-``k`` support, no ``T²`` (:func:`jaxkd.losses.topk_generalized_jsd`).

    ``β = 0`` is forward KL on the teacher's top-``k``, ``β = 1`` reverse KL on the student's top-``k``, and
    ``0 < β < 1`` the JSD on their union (``support="auto"``, TRL's rule; or ``"teacher"``, ``"student"``,
    ``"union"``). ``tail="bucket"`` keeps the remaining mass as one extra category (TRL's ``add_tail=True``),
    ``"drop"`` renormalizes over the support. The teacher is dense (its logits are a gradient-stopped target);
    for a stored offline top-k use :func:`~jaxkd.methods.sparse_forward_kl`. Registry name
    ``"topk_generalized_jsd"``; ``student``/``teacher`` name the participants in the two roles.
    """
    check_in_range("beta", beta, 0.0, 1.0)
    k = check_topk_arguments(k, tail, support, temperature, name)
    return logit_method(name, losses.topk_generalized_jsd, student=student, teacher=teacher, weight=weight,
                        k=k, beta=float(beta), support=support, tail=tail, temperature=temperature)
