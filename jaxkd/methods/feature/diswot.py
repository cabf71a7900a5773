"""DisWOT as a method (its similarity-matrix distillers) and its training-free ranking of candidate students."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxkd.batch import IMAGE, LABEL
from jaxkd import losses
from jaxkd.checks import check_nonnegative
from jaxkd.methods.base import LossInputs, Method, Weight, check_roles, stateless_method
from jaxkd.methods.features import student_feature, teacher_feature
from jaxkd.methods.registry import LOGIT_ROLES, register
from jaxkd.models.base import get_feature

__all__ = ["diswot", "diswot_rank"]


@register(
    "diswot", inputs="feature_maps",
    paper="Dong, Li & Wei, *DisWOT: Student Architecture Search for Distillation WithOut Training*, CVPR 2023",
    losses=("diswot_relation", "diswot_semantic", "fc_gradient", "diswot_score"),
    contract=LOGIT_ROLES,
)
def diswot(
    *,
    feature: str = "stage3",
    embedding: str = "pooled",
    relation_weight: float = 1.0,
    semantic_weight: float = 1.0,
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "diswot",
) -> Method:
    """DisWOT's metrics used as distillers: ``relation_weight · diswot_relation(f_s, f_t) + semantic_weight ·
    diswot_semantic(z_s, e_s, z_t, e_t, y)`` (:mod:`jaxkd.losses.feature.diswot`).

    ``feature``: the map before global pooling (the official ``feat[-2]``), compared through its batch
    Gram matrices (any widths); ``embedding``: what the final linear layer reads, for the class-activation
    weights ``∂CE/∂W_fc`` compared through their class-similarity matrices. The paper reports the
    distillers on top of KD (``"ce + kd + diswot"``); the official code does not publish the distillation
    weights, so both are 1 here. Metrics: ``relation``, ``semantic``.

    ``student``/``teacher`` name the participants in the two roles, as in :func:`~jaxkd.methods.kd`: the
    learner's map, logits and embedding are those of the participant in the ``student`` role; the teacher's
    are gradient-stopped targets.
    """
    check_nonnegative("relation_weight", relation_weight)
    check_nonnegative("semantic_weight", semantic_weight)
    check_roles(name, student, teacher)

    def compute(inputs: LossInputs, rng):
        target = inputs.target(teacher, method=name)
        mask = inputs.label_mask
        relation = losses.diswot_relation(
            student_feature(inputs, feature, method=name, participant=student),
            teacher_feature(inputs, feature, method=name, participant=teacher), mask=inputs.example_mask,
        )
        semantic = losses.diswot_semantic(
            inputs.output(student, method=name).logits,
            student_feature(inputs, embedding, method=name, participant=student), target.logits,
            teacher_feature(inputs, embedding, method=name, participant=teacher), inputs.labels(name), mask=mask,
        )
        value = relation_weight * relation + semantic_weight * semantic
        return value, {"relation": relation, "semantic": semantic}

    return stateless_method(name, compute, weight=weight, needs_labels=True,
                            participants=(student, teacher), trained=(student,))


def diswot_rank(
    teacher: Any,
    candidates: Mapping[str, Any],
    batch: Mapping[str, Any],
    *,
    rng: jax.Array,
    teacher_variables: Any = None,
    feature: str = "stage3",
    embedding: str = "pooled",
    semantic: bool = True,
    input_key: str = IMAGE,
    label_key: str = LABEL,
) -> list[tuple[str, float]]:
    """DisWOT's training-free student search step: scores every candidate student for ``teacher`` on one
    batch and returns ``[(name, score), ...]`` best first (:func:`jaxkd.losses.diswot_score`; ties keep the
    order of ``candidates``).

    Every candidate (a :class:`jaxkd.models.Model`) is initialized with ``rng`` — and so is the teacher
    unless ``teacher_variables`` are given: the paper scores *randomly initialized* teacher and student
    networks (the official code re-initializes both with Gaussian weights). With one key, a candidate of
    the teacher's own architecture gets the teacher's weights, so its distances are 0 and it ranks first.
    Models run in eval mode. The ranking is deterministic for a given ``rng``.
    """
    x, labels = batch[input_key], jnp.asarray(batch[label_key])
    if teacher_variables is None:
        teacher_variables = teacher.init(rng, x)
    t_out = teacher.apply(teacher_variables, x, train=False)
    scores = []
    for cand_name, model in candidates.items():
        s_out = model.apply(model.init(rng, x), x, train=False)
        kw = {}
        if semantic:
            kw = dict(
                student_logits=s_out.logits, student_embedding=get_feature(s_out, embedding, who=cand_name),
                teacher_logits=t_out.logits, teacher_embedding=get_feature(t_out, embedding, who="teacher"),
                labels=labels,
            )
        score = losses.diswot_score(
            get_feature(s_out, feature, who=cand_name), get_feature(t_out, feature, who="teacher"), **kw
        )
        scores.append((cand_name, float(score)))
    order = sorted(range(len(scores)), key=lambda i: (-scores[i][1], i))
    return [scores[i] for i in order]
