"""LSSKD as a method: auxiliary classifiers on the student's stages, layered self-distillation (no teacher)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_int, check_nonnegative, check_temperature
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Weight
from jaxkd.methods.ofa import _stage_names, apply_heads, branch_heads, init_heads
from jaxkd.methods.registry import register

__all__ = ["lsskd"]


@register(
    "lsskd",
    paper="Dahri et al., *A Layered Self-Supervised Knowledge Distillation Framework for Efficient Multimodal "
    "Learning on the Edge*, 2025",
    losses=("lsskd", "lsskd_terms"),
    status="supported (without the self-supervised input transformations)",
)
def lsskd(
    *,
    stages: Sequence[str] = ("stage1", "stage2", "stage3"),
    temperature: float = 3.0,
    aux_ce_weight: float = 1.0,
    aux_kd_weight: float = 1.0,
    final_kd_weight: float = 1.0,
    width: int | None = None,
    embedding: str = "pooled",
    weight: Weight = 1.0,
    name: str = "lsskd",
) -> Method:
    """LSSKD (:func:`jaxkd.losses.lsskd`): an auxiliary classifier on each of the student's ``stages``
    (the branch heads of :class:`jaxkd.methods.ofa.BranchHead`: downsampling convolutions to the width
    of the student's ``embedding``, pooling, a linear classifier), trained with the labels and the final
    classifier's distribution, which in turn learns their mean distribution. No teacher: ``"ce + lsskd"``.
    The auxiliary classifiers are dropped at inference. Metrics: ``ce_aux``, ``kd_aux``, ``kd_final``.

    Documented assumptions (see :func:`jaxkd.losses.lsskd`): the auxiliary classifiers predict the
    original classes (the paper's self-supervised augmented label space over input transformations is not
    implemented), and the layer-to-layer transfer is the two-way KL with the final classifier.
    """
    stage_names = _stage_names(stages)
    check_temperature("temperature", temperature)
    for n, v in (("aux_ce_weight", aux_ce_weight), ("aux_kd_weight", aux_kd_weight), ("final_kd_weight", final_kd_weight)):
        check_nonnegative(n, v)
    if width is not None:
        width = check_int("width", width, low=1)

    def heads_of(inputs):
        return branch_heads(inputs, stage_names, width=width, embedding=embedding, method=name, teacher=None)

    def init(rng, inputs: LossInputs) -> MethodVars:
        return init_heads(heads_of(inputs), rng, inputs, method=name)

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        head_logits, state = apply_heads(heads_of(inputs), vars, inputs, method=name)
        aux = jnp.stack([head_logits[s] for s in stage_names], axis=-2)
        labels, mask = inputs.labels(name), inputs.label_mask
        final = inputs.student.logits
        ce_aux, kd_aux, kd_final = losses.lsskd_terms(
            final, aux, jax.lax.stop_gradient(final), jax.lax.stop_gradient(aux), labels,
            temperature=temperature, mask=mask,
        )
        value = aux_ce_weight * ce_aux + aux_kd_weight * kd_aux + final_kd_weight * kd_final
        return value, LossAux({"ce_aux": ce_aux, "kd_aux": kd_aux, "kd_final": kd_final}, state)

    return Method(name=name, loss=loss, init=init, weight=weight, needs_labels=True)
