"""Margin-MSE as a method: the student's score margins between candidates regressed on the teacher's."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_choice
from jaxkd.methods.base import Method, Weight, check_roles, stateless_method
from jaxkd.methods.registry import LOGIT_ROLES, register
from jaxkd.methods.logit.ranking import candidate_scores, label_first

__all__ = ["margin_mse"]


@register(
    "margin_mse",
    paper="Hofstätter, Althammer, Schröder, Sertkan & Hanbury, *Improving Efficient Neural Ranking Models with "
    "Cross-Architecture Knowledge Distillation*, arXiv 2020",
    losses=("margin_mse",),
    contract=LOGIT_ROLES,
)
def margin_mse(
    *,
    candidate_mask: str | None = None,
    positive: str = "first",
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "margin_mse",
) -> Method:
    """Margin-MSE (:func:`jaxkd.losses.margin_mse`) between the student's and the teacher's score margins.

    The participants' logits are ``[B, N]`` candidate scores with the positive in column 0 (``N = 2``:
    the paper's training triples). ``candidate_mask`` names a boolean ``[B, N]`` batch entry marking the
    real candidates (ragged lists); ``None`` uses all. Official: the loss alone (no CE), weight 1.

    ``positive="label"`` reads classification logits as candidate lists: the labeled class is the
    positive and every other class a negative, so the loss matches the margins ``z_y − z_j`` of student
    and teacher (how the digits comparison runs it; the candidate mask must then be ``None``).
    """
    check_roles(name, student, teacher)
    check_choice("positive", positive, ("first", "label"))
    if positive == "label" and candidate_mask is not None:
        raise ValueError("margin_mse: positive='label' reorders the classes; it takes no candidate_mask")

    def compute(inputs, rng):
        s, t, mask = candidate_scores(inputs, student, teacher, candidate_mask, name)
        if positive == "label":
            labels = inputs.labels(name)
            s, t = label_first(s, labels), label_first(t, labels)
            return losses.margin_mse(s, t, mask=inputs.label_mask)
        return losses.margin_mse(s, t, candidate_mask=mask, mask=inputs.example_mask)

    keys = () if candidate_mask is None else (candidate_mask,)
    return stateless_method(name, compute, weight=weight, batch_keys=keys,
                            participants=(student, teacher), trained=(student,), needs_labels=positive == "label")
