"""Ranking distillation methods: Margin-MSE and listwise KL over candidate scores.

The participants' ``logits`` are the scores ``[B, num_candidates]`` of each query's candidate list (a
re-ranker scoring ``N`` documents per query); an optional batch entry marks the real candidates of
ragged lists.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_choice, check_temperature
from jaxkd.methods.base import Method, Weight, check_roles, require, stateless_method
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["listwise_kd", "margin_mse"]


def _scores(inputs, student: str, teacher: str, candidate_mask: str | None, name: str):
    s = inputs.output(student, method=name).logits
    t = inputs.target(teacher, method=name).logits
    mask = None if candidate_mask is None else require(inputs.batch, candidate_mask, method=name)
    return s, t, mask


def _label_first(scores: jax.Array, labels: jax.Array) -> jax.Array:
    """``scores`` with column 0 and the label's column swapped: the labeled class becomes the positive."""
    columns = jnp.arange(scores.shape[-1])
    y = labels[:, None]
    order = jnp.where(columns == 0, y, jnp.where(columns == y, 0, columns))
    return jnp.take_along_axis(scores, order, axis=-1)


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
        s, t, mask = _scores(inputs, student, teacher, candidate_mask, name)
        if positive == "label":
            labels = inputs.labels(name)
            s, t = _label_first(s, labels), _label_first(t, labels)
            return losses.margin_mse(s, t, mask=inputs.label_mask)
        return losses.margin_mse(s, t, candidate_mask=mask, mask=inputs.example_mask)

    keys = () if candidate_mask is None else (candidate_mask,)
    return stateless_method(name, compute, weight=weight, batch_keys=keys,
                            participants=(student, teacher), trained=(student,), needs_labels=positive == "label")


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
        s, t, mask = _scores(inputs, student, teacher, candidate_mask, name)
        return losses.listwise_kd(
            s, t, temperature=temperature, teacher_temperature=teacher_temperature, candidate_mask=mask,
            mask=inputs.example_mask,
        )

    keys = () if candidate_mask is None else (candidate_mask,)
    return stateless_method(name, compute, weight=weight, batch_keys=keys,
                            participants=(student, teacher), trained=(student,))
