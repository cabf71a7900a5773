"""Reverse KL over the student's top-k classes with a tail bucket (TRL's top-k reverse KL) as a method."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.methods.base import Method, Weight, logit_method
from jaxkd.methods.logit.topk_generalized_jsd import check_topk_arguments
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["topk_reverse_kl"]


@register(
    "topk_reverse_kl", example="k=2",
    paper="reverse KL on the student's top-k with a tail bucket (TRL's top-k distillation; MiniLLM/GKD's reverse KL)",
    losses=("topk_generalized_jsd",), contract=LOGIT_ROLES,
)
def topk_reverse_kl(
    *, k: int | None = None, support: str = "student", tail: str = "bucket", temperature: float = 1.0,
    student: str = "student", teacher: str = "teacher", weight: Weight = 1.0, name: str = "topk_reverse_kl",
) -> Method:
    """Reverse KL ``KL(p̃_S ‖ p̃_T)`` over a top-``k`` support, no ``T²``
    (:func:`jaxkd.losses.topk_generalized_jsd` at ``β = 1``).

    The support is the student's top-``k`` by default (TRL's rule for reverse KL; ``"teacher"`` or ``"union"``
    otherwise); ``tail="bucket"`` adds the remaining mass as one category, ``"drop"`` renormalizes over the
    support. Registry name ``"topk_reverse_kl"``; ``student``/``teacher`` name the participants in the two roles
    (the teacher's logits are a gradient-stopped target).
    """
    k = check_topk_arguments(k, tail, support, temperature, name)
    return logit_method(name, losses.topk_generalized_jsd, student=student, teacher=teacher, weight=weight,
                        k=k, beta=1.0, support=support, tail=tail, temperature=temperature)
