"""KD³ as a method: combined-prediction instance selection, selection-weighted KD and embedding alignment
(through a linear connector when the widths differ), and classifier-parameter alignment."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_in_range, check_nonnegative, check_temperature
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Weight
from jaxkd.methods.connectors import LinearConnector
from jaxkd.methods.features import module_apply, module_init, student_feature, teacher_feature
from jaxkd.methods.registry import register
from jaxkd.methods.simkd import frozen_variables, param_at

__all__ = ["kd3"]


@register(
    "kd3",
    paper="Tang, Chen, Niu, Sugiyama & Gong, *Distribution Shift Matters for Knowledge Distillation with Webly "
    "Collected Images*, ICCV 2023",
    losses=("kd3_selection", "kd3_terms", "kd3_classifier_alignment"),
    status="supported (selection, feature and classifier alignment reconstructed from the paper's abstract; "
    "no official code; without the MixDistribution block)",
)
def kd3(
    *,
    temperature: float = 4.0,
    threshold: float = 0.5,
    teacher_weight: float = 0.5,
    feature_weight: float = 1.0,
    classifier_weight: float = 1.0,
    embedding: str = "pooled",
    teacher_embedding: str | None = None,
    classifier: str = "fc",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "kd3",
) -> Method:
    """KD³ (Tang, Chen, Niu, Sugiyama & Gong, "Distribution Shift Matters for Knowledge Distillation with
    Webly Collected Images", ICCV 2023), without its MixDistribution contrastive block.

    ``L = Σ_i w_i [kd_i + β·feature_i] / Σ_i w_i + γ · classifier``:

    * ``w_i`` — :func:`jaxkd.losses.kd3_selection`: example ``i`` is distilled when the combined
      prediction ``λ·p_t + (1 − λ)·p_s`` (``λ = teacher_weight``) has confidence ``>= threshold``;
    * ``kd_i``, ``feature_i`` — :func:`jaxkd.losses.kd3_terms`: ``T²·KL(p_t^T ‖ p_s^T)`` and the mean
      squared error between the student's ``embedding`` (through a trainable
      :class:`~jaxkd.methods.connectors.LinearConnector` when its width differs from the teacher's) and the
      teacher's; ``β = feature_weight``;
    * ``classifier`` — :func:`jaxkd.losses.kd3_classifier_alignment` between the student's classifier
      (its dense layer at ``classifier``, ``"fc"`` on the CIFAR models and the MLP: read from the student's
      differentiated variables) and the teacher's, pulled back through the connector; ``γ =
      classifier_weight`` (0 leaves the student's classifier alone).

    No official code was found: the abstract fixes the three ingredients, not their formulas; every
    choice (convex combination and confidence threshold for the selection, KL for the logits, MSE for
    features and parameters, the defaults) is this implementation's and is stated in the loss docstrings.
    The selection is recomputed every step from the current student (the paper's "dynamic" selection).
    Metrics: ``kd``, ``feature``, ``classifier``, ``selected`` (fraction of valid examples selected).
    """
    check_temperature("temperature", temperature)
    check_in_range("threshold", threshold, 0.0, 1.0)
    check_in_range("teacher_weight", teacher_weight, 0.0, 1.0)
    check_nonnegative("feature_weight", feature_weight)
    check_nonnegative("classifier_weight", classifier_weight)
    t_name = teacher_embedding or embedding

    def embeddings(inputs: LossInputs):
        s = student_feature(inputs, embedding, method=name)
        t = teacher_feature(inputs, t_name, method=name, participant=teacher)
        if len(s.shape) != 2 or len(t.shape) != 2:
            raise ValueError(
                f"{name!r} aligns [B, D] embeddings; got student {embedding!r} {tuple(s.shape)} and teacher "
                f"{t_name!r} {tuple(t.shape)}"
            )
        return s, t

    def dense_of(inputs: LossInputs, participant: str):
        params = frozen_variables(inputs, participant, method=name)["params"]
        fc = param_at(params, classifier, who=f"participant {participant!r}", method=name)
        if not hasattr(fc, "keys") or "kernel" not in fc:
            raise ValueError(f"{name!r}: {participant!r}'s {classifier!r} is not a dense layer with a 'kernel'")
        return fc["kernel"], fc.get("bias")

    def init(rng, inputs: LossInputs) -> MethodVars:
        s, t = embeddings(inputs)
        if classifier_weight:
            for participant, width in (("student", s.shape[-1]), (teacher, t.shape[-1])):
                kernel, _ = dense_of(inputs, participant)
                if kernel.shape[0] != width:
                    raise ValueError(
                        f"{name!r}: {participant!r}'s classifier {classifier!r} takes {kernel.shape[0]} features but "
                        f"its embedding has {width}; pick the embedding the classifier reads"
                    )
        if s.shape[-1] == t.shape[-1]:
            return MethodVars()
        v = module_init(LinearConnector(t.shape[-1]), rng, s)
        return MethodVars(params={"connector": v.params})

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        s, t = embeddings(inputs)
        zs, zt = inputs.student.logits, jax.lax.stop_gradient(inputs.teacher_outputs(name).logits)
        connector = None
        if "connector" in vars.params:
            s, _ = module_apply(LinearConnector(t.shape[-1]), MethodVars(vars.params["connector"], {}), s)
            connector = vars.params["connector"]["Dense_0"]
        selected = losses.kd3_selection(zs, zt, threshold=threshold, teacher_weight=teacher_weight)
        kd, feature = losses.kd3_terms(zs, zt, s, t, temperature=temperature, mask=inputs.example_mask,
                                       weights=selected)
        total = kd + feature_weight * feature
        metrics = {"kd": kd, "feature": feature,
                   "selected": losses.reduce_loss(selected, mask=inputs.example_mask)}
        if classifier_weight:
            ws, bs = dense_of(inputs, "student")
            wt, bt = dense_of(inputs, teacher)
            cls = losses.kd3_classifier_alignment(
                ws, bs, wt, bt, None if connector is None else connector["kernel"],
                None if connector is None else connector["bias"],
            )
            metrics["classifier"] = cls
            total = total + classifier_weight * cls
        return jnp.asarray(total, jnp.float32), LossAux(metrics, vars.state)

    return Method(name=name, loss=loss, init=init, weight=weight, participants=(teacher,))
