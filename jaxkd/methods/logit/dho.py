"""Dual-Head Optimization as a method: a second head on the student's embedding, trained by the teacher,
mixed with the model's own head at inference."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_in_range, check_temperature
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight, check_roles
from jaxkd.methods.heads import feature_head, feature_head_init
from jaxkd.methods.registry import LOGIT_ROLES, register
from jaxkd.models.base import Outputs

__all__ = ["dho"]


@register(
    "dho",
    paper="Kang et al., *Dual-Head Optimization* (semi-supervised KD from VLMs), 2025",
    losses=("dho", "dho_terms", "dho_log_probs"),
    status="supported (heads mixed at inference; unlabeled examples via `batch['labeled']`)",
    contract=LOGIT_ROLES,
)
def dho(
    *,
    temperature: float = 2.0,
    ce_weight: float = 0.5,
    kd_weight: float = 0.5,
    mix: float = 0.5,
    kd_head_temperature: float = 1.0,
    feature: str = "pooled",
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "dho",
) -> Method:
    """DHO (:func:`jaxkd.losses.dho`): ``ce_weight·CE(z_ce, y)`` over the labeled examples +
    ``kd_weight·T²·KL(softmax(z_t/T) ‖ softmax(z_kd/T))`` over all of them.

    Kang et al., "Simple yet Effective Semi-supervised Knowledge Distillation from Vision-Language Models
    via Dual-Head Optimization", 2025. ``z_ce`` is the student's own logits; ``z_kd`` a linear head on
    ``feature`` (a method parameter). Semi-supervised batches mark which examples carry a label with a
    boolean ``batch["labeled"]``: unlabeled ones train the KD head only. Inference (``predict``) mixes
    the heads (:func:`jaxkd.losses.dho_log_probs`); the official code grid-searches ``mix`` and the head
    temperature on validation data, these defaults use 0.5 and 1.0. It replaces ``ce + kd`` (don't
    chain another ``ce``). Metrics: ``ce``, ``kd``.

    ``student``/``teacher`` name the participants in the two roles, as in :func:`~jaxkd.methods.kd`: the KD
    head reads the features of the participant in the ``student`` role, whose own logits take the CE term,
    and the teacher's logits are a gradient-stopped target. Evaluation scores the student, so the heads are
    mixed at inference only when the learner is the student; for another learner (``dho(student="peer",
    teacher="student")``) the KD head is a training aid of that participant and the student is evaluated
    on its own logits.
    """
    check_roles(name, student, teacher)
    check_temperature("temperature", temperature)
    check_temperature("kd_head_temperature", kd_head_temperature)
    check_in_range("mix", mix, 0.0, 1.0)

    def init(rng, inputs: LossInputs) -> MethodVars:
        learner = inputs.output(student, method=name)
        return MethodVars(params={"kd_head": feature_head_init(rng, learner, feature)})

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        learner, target = inputs.output(student, method=name), inputs.target(teacher, method=name)
        ce, distill = losses.dho_terms(
            learner.logits, feature_head(vars.params["kd_head"], learner, feature), target.logits,
            inputs.labels(name), temperature=temperature, mask=inputs.example_mask,
            labeled=inputs.labeled,
        )
        return ce_weight * ce + kd_weight * distill, LossAux({"ce": ce, "kd": distill}, vars.state)

    def predict(vars: MethodVars, outputs: Outputs):
        kd_logits = feature_head(vars.params["kd_head"], outputs, feature)
        return losses.dho_log_probs(outputs.logits, kd_logits, mix=mix, kd_head_temperature=kd_head_temperature)

    return Method(name=name, loss=loss, init=init, weight=weight,
                  predict=predict if student == "student" else None,
                  needs=Needs(trained=(student,), participants=(teacher,), labels=True))
