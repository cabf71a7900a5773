"""FuseLLM as a method: several language models fused into one token target for the student (over
:mod:`jaxkd.losses.fusion.fusellm`).

The teachers are participants of the train state (``"teacher"``, ``"teacher_b"`` …) sharing the
student's vocabulary here — FuseLLM's token alignment across tokenizers is the host-side
:func:`jaxkd.losses.fusellm_align_logits`. Every teacher runs in the step, frozen and gradient-stopped.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_choice, check_in_range, check_int
from jaxkd.losses.lm.tokens import shift_logits
from jaxkd.methods.base import LossInputs, Method, Weight, check_roles, stateless_method
from jaxkd.methods.registry import register
from jaxkd.methods.lm.tokens import LM_KEYS, lm_targets

__all__ = ["fusellm"]


@register(
    "fusellm", inputs="tokens",
    paper="Wan et al., *Knowledge Fusion of Large Language Models* (FuseLLM), ICLR 2024",
    losses=("fusellm", "fusellm_fused_target", "fusellm_token_alignment"),
    status="supported (teachers sharing the student's vocabulary in the step; alignment is host-side)",
)
def fusellm(
    *,
    teachers: Sequence[str] = ("teacher", "teacher_b"),
    lm_weight: float = 0.9,
    rule: str = "min_ce",
    divergence: str = "ce",
    temperature: float = 1.0,
    top_k: int | None = None,
    student: str = "student",
    weight: Weight = 1.0,
    name: str = "fusellm",
) -> Method:
    """FuseLLM: ``λ·CE(gold) + (1 − λ)·D(P_fused, p_S)`` per token, with ``P_fused`` the distribution of the
    teacher whose gold cross-entropy on the sequence is lowest (``rule="min_ce"``) or the CE-weighted
    mixture (``"avg_ce"``), as the official code computes them (:func:`jaxkd.losses.fusellm`; official
    ``λ = 0.9``, MinCE, soft cross-entropy ``D``). The hard-label term is part of the loss: use it instead
    of, not next to, ``lm_ce``. Metrics: none besides the loss. ``student`` names the participant that
    learns; the ``teachers``' logits are gradient-stopped targets (trained or not)."""
    teachers = tuple(teachers)
    if len(teachers) < 1 or len(set(teachers)) != len(teachers):
        raise ValueError(f"teachers must name distinct participants, got {teachers}")
    for t in teachers:
        check_roles(name, student, t)
    check_in_range("lm_weight", lm_weight, 0.0, 1.0)
    check_choice("rule", rule, ("min_ce", "avg_ce"))
    check_choice("divergence", divergence, ("ce", "kl"))
    if top_k is not None:
        check_int("top_k", top_k, low=1)

    def compute(inputs: LossInputs, rng):
        targets, target_mask, normalizer = lm_targets(inputs.batch)
        stacked = jnp.stack([shift_logits(inputs.target(t, method=name).logits) for t in teachers])
        return losses.fusellm(shift_logits(inputs.output(student, method=name).logits), stacked, targets,
                                   lm_weight=lm_weight, rule=rule, divergence=divergence, temperature=temperature,
                                   top_k=top_k, mask=target_mask, normalizer=normalizer)

    return stateless_method(name, compute, weight=weight, participants=(student, *teachers),
                            trained=(student,), batch_keys=LM_KEYS)
