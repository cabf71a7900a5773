"""Expert Merging as a method: align the merged student's logits and named hidden states with each expert's
on that expert's calibration entry, plus the coefficient regularizer. The student is a merged model
(:func:`jaxkd.merging.expert_merging.expert_merging_model`) whose only parameters are the coefficients; the
experts are frozen participants. Unlabeled: no label is read."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import losses
from jaxkd.checks import check_choice, check_nonnegative, check_temperature, check_teacher_weights
from jaxkd.losses.core import feature_mse
from jaxkd.merging.expert_merging import COLLECTION, coefficients
from jaxkd.methods.base import LossInputs, Method, Weight, stateless_method
from jaxkd.methods.registry import register
from jaxkd.models.base import get_feature

__all__ = ["expert_merging"]


def _names(name: str, value, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not value \
            or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{name}: {what} must be a non-empty sequence of names, got {value!r}")
    return tuple(value)


def coefficient_regularizer(variables, *, kind: str = "l1") -> jax.Array:
    """The official regularizer (``compute_regularization_loss``): ``Σ |λ − λ₀|`` over every coefficient, divided
    by the number of coefficients per expert (``Σ_l K_l``); ``kind="l2"`` squares the deviations instead."""
    lam = coefficients(variables)
    lam0 = variables[COLLECTION]["init"]
    total, per_expert = 0.0, 0
    for g, v in lam.items():
        d = v - jnp.asarray(lam0[g], v.dtype)
        total = total + jnp.sum(jnp.abs(d) if kind == "l1" else d * d)
        per_expert += int(v.shape[1])
    return total / per_expert


@register(
    "expert_merging",
    paper="Zhang et al., *Expert Merging: Model Merging with Unsupervised Expert Alignment and Importance-Guided "
          "Layer Chunking*, 2025",
    losses=("kd",),
    status="supported; Expert Merging++'s chunk allocation (jaxkd.merging.chunk_plan) is our reading of the paper",
    example="experts=('teacher',), entries=('image',)",
)
def expert_merging(
    *,
    experts: Sequence[str],
    entries: Sequence[str],
    features: Sequence[str] = (),
    task_weights: Sequence[float] | None = None,
    temperature: float = 1.0,
    logit_loss: str = "kd",
    logit_weight: float = 1.0,
    hidden_weight: float = 1.0,
    reg_weight: float = 5.0,
    regularizer: str = "l1",
    student: str = "student",
    weight: Weight = 1.0,
    name: str = "expert_merging",
) -> Method:
    """Expert Merging's loss (Zhang et al., 2025; official code Littleor/ExpertMerging,
    ``global_utils/expert_merging_base.py`` at 3b9a031):

        L = (1/E) Σ_i α_i [ w_logit · L_logit(s_i, t_i) + w_hidden · (1/|F|) Σ_f mean((s_i^f − t_i^f)²) ]
            + w_reg · Σ |λ − λ₀| / Σ_l K_l

    where ``t_i`` are expert ``experts[i]``'s outputs on ``batch[entries[i]]`` and ``s_i`` the merged student's on
    the same examples (the student reads the entries concatenated, as
    :func:`jaxkd.merging.expert_merging_participants` builds it; its outputs are cut back per entry).
    ``L_logit`` is ``kd`` (``T² · KL(softmax(t/T) ‖ softmax(s/T))``, mean over every position): the official code
    uses the soft cross-entropy ``T² · CE``, which differs by the experts' entropy — a constant, so the same
    gradients — or ``"mse"`` (mean squared logit difference). The hidden-state term is the official
    ``F.mse_loss`` per named feature, averaged over ``features``; with none, logits only (the official default,
    ``hidden_states_layers=None``). The official trainer sees one calibration example of one task per step and
    averages 8 accumulated steps; here every expert's entry is in each batch and the task losses are averaged.

    Defaults are the official command line's: ``temperature=1``, ``hidden_weight=1``, ``reg_weight=5`` (its
    ``--sparsity_reg_weight``), L1 regularizer; it trains with AdamW (lr 0.5, weight decay 1e-5, gradients
    clipped at norm 1), init 0.1.

    Args:
      experts: the frozen expert participants, one per calibration entry.
      entries: the batch entry each expert's calibration examples are in.
      features: names of hidden states sown by the model (the merged model sows what the base does).
      task_weights: ``α_i`` per expert (the official ``loss_alphas``); default 1 each.
      logit_loss: ``"kd"`` or ``"mse"``.
      regularizer: ``"l1"`` (official) or ``"l2"``.
      student: the merged model's participant.
    """
    experts = _names(name, experts, "experts")
    entries = _names(name, entries, "entries")
    if len(entries) != len(experts):
        raise ValueError(f"{name}: {len(entries)} entries for {len(experts)} experts (one calibration entry each)")
    features = tuple(features)
    if not all(isinstance(f, str) for f in features):
        raise ValueError(f"{name}: features must be feature names, got {features!r}")
    alphas = check_teacher_weights(len(experts), task_weights) if task_weights is not None else np.ones(len(experts))
    check_temperature("temperature", temperature)
    check_choice("logit_loss", logit_loss, ("kd", "mse"))
    check_choice("regularizer", regularizer, ("l1", "l2"))
    for label, value in (("logit_weight", logit_weight), ("hidden_weight", hidden_weight), ("reg_weight", reg_weight)):
        check_nonnegative(label, value)

    def logit_term(s, t):
        if logit_loss == "kd":
            return losses.kd(s, t, temperature=temperature)
        return jnp.mean(feature_mse(s, t, mismatch=f"{name}: logits of shapes {{student}} and {{teacher}}"))

    def compute(inputs: LossInputs, rng):
        out = inputs.output(student, method=name)
        sizes = [int(np.shape(inputs.batch[k])[0]) for k in entries]
        if out.logits.shape[0] != sum(sizes):
            raise ValueError(f"{name}: the student has outputs for {out.logits.shape[0]} examples, but the entries "
                             f"{list(entries)} hold {sum(sizes)}: the merged student reads them concatenated "
                             "(jaxkd.merging.expert_merging_participants)")
        variables = inputs.variables.get(student)
        if variables is None or COLLECTION not in variables:
            raise ValueError(f"{name}: participant {student!r} is not a merged model: build it with "
                             "jaxkd.merging.expert_merging_model (its only parameters are the merge coefficients)")
        total_logit, total_hidden, task = 0.0, 0.0, 0.0
        start = 0
        for i, (expert, size) in enumerate(zip(experts, sizes)):
            t = inputs.target(expert, method=name)
            cut = lambda x, start=start, size=size: x[start:start + size]
            logit = logit_term(cut(out.logits), t.logits)
            hidden = 0.0
            for f in features:
                s_f = cut(get_feature(out, f, who=student))
                t_f = get_feature(t, f, who=expert)
                hidden = hidden + jnp.mean(feature_mse(s_f, t_f, mismatch=f"{name}: feature {f!r} has shapes "
                                                       "{student} (merged) and {teacher} (" + expert + ")"))
            hidden = hidden / max(len(features), 1)
            task = task + alphas[i] * (logit_weight * logit + hidden_weight * hidden)
            total_logit, total_hidden = total_logit + logit, total_hidden + hidden
            start += size
        reg = coefficient_regularizer(variables, kind=regularizer)
        loss = task / len(experts) + reg_weight * reg
        metrics = {"logits": total_logit / len(experts), "regularizer": reg}
        if features:
            metrics["hidden"] = total_hidden / len(experts)
        return loss, metrics

    return stateless_method(name, compute, weight=weight, participants=experts, trained=(student,),
                            batch_keys=tuple(dict.fromkeys(entries)))
