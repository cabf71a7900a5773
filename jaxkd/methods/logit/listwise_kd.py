"""Listwise KD as a method: the KL between teacher and student softmaxes over each query's candidate list."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_temperature
from jaxkd.methods.base import Method, Weight, check_roles, stateless_method
from jaxkd.methods.registry import LOGIT_ROLES, register
from jaxkd.methods.logit.ranking import candidate_scores

__all__ = ["listwise_kd"]


@register(
    "listwise_kd",
    paper="Tamber, Kazi, Sourabh & Lin, *Teaching Dense Retrieval Models to Specialize with Listwise Distillation "
    "and LLM Data Augmentation*, arXiv 2025",
    losses=("listwise_kd",),
    contract=LOGIT_ROLES,
)
def listwise_kd(
    *,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    candidate_mask: str | None = None,
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "listwise_kd",
) -> Method:
    """Listwise distillation (:func:`jaxkd.losses.listwise_kd`): KL from the teacher's softmax over each
    query's candidate scores to the student's.

    The participants' logits are ``[B, N]`` candidate scores; ``candidate_mask`` names a boolean
    ``[B, N]`` batch entry marking the real candidates of ragged lists (``None``: all are real).
    """
    check_roles(name, student, teacher)
    check_temperature("temperature", temperature)
    if teacher_temperature is not None:
        check_temperature("teacher_temperature", teacher_temperature)

    def compute(inputs, rng):
        s, t, mask = candidate_scores(inputs, student, teacher, candidate_mask, name)
        return losses.listwise_kd(
            s, t, temperature=temperature, teacher_temperature=teacher_temperature, candidate_mask=mask,
            mask=inputs.example_mask,
        )

    keys = () if candidate_mask is None else (candidate_mask,)
    return stateless_method(name, compute, weight=weight, batch_keys=keys,
                            participants=(student, teacher), trained=(student,))
