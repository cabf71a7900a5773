"""Token-level KD as a method: any divergence per next-token distribution, optionally fused with the output projection."""

from __future__ import annotations

import jax
from jaxkd import losses
from jaxkd.checks import check_int, check_positive
from jaxkd.methods.base import LossInputs, Method, Weight, check_roles, stateless_method
from jaxkd.methods.registry import LOGIT_ROLES, register
from jaxkd.methods.lm.tokens import (
    LM_KEYS,
    TOKEN_DIVERGENCES,
    full_length_mask,
    hidden_states_of,
    lm_targets,
    output_projection_of,
    token_divergence,
)

__all__ = ["token_kd"]


@register(
    "token_kd", inputs="tokens",
    paper="token-level KD of LMs: every divergence per next-token distribution (Kim & Rush 2016; GKD; DistiLLM)",
    losses=tuple(fn.__name__ for fn, _ in TOKEN_DIVERGENCES.values()) + ("fused_linear_divergence",),
    contract=LOGIT_ROLES,
)
def token_kd(
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float | None = None,
    alpha: float | None = None,
    fused: bool = False,
    chunk_size: int = 512,
    softcap: float | None = None,
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "token_kd",
) -> Method:
    """Token-level distillation: ``divergence(p_S(·|x_≤t), p_T(·|x_≤t))`` averaged over the batch's target
    tokens (padding and the last position excluded), no ``T²`` (TRL's and DistiLLM's convention).

    Args:
      divergence: ``"forward_kl"``, ``"reverse_kl"``, ``"js_divergence"``, ``"generalized_jsd"`` (``beta``,
        TRL's convention: 0 forward, 1 reverse KL), ``"skew_kl"`` / ``"skew_reverse_kl"`` (``alpha``,
        DistiLLM) or ``"total_variation"``.
      fused: compute from the final hidden states (feature ``"hidden"``) and output projections, chunk by
        chunk, never holding ``[B, T, V]`` logits (:func:`jaxkd.losses.fused_linear_divergence`); the same
        value and gradients.
      chunk_size: tokens per chunk of the fused computation.
      softcap: with ``fused=True``, Gemma's ``final_logit_softcapping`` ``c``: both models' projected logits
        ``hidden @ head`` become ``c·tanh(z / c)`` before the divergence, as the model's own logits are
        (:func:`jaxkd.losses.fused_linear_divergence`). Refused without ``fused``: the logits path reads the
        models' logits, which already carry their cap.
      student: the participant that learns (its logits, or hidden states and output projection, are trained).
      teacher: the participant distilled from (a gradient-stopped target, trained or not):
        ``token_kd(student="peer", teacher="student")`` teaches a peer and never trains the student.
    """
    loss_fn = token_divergence(divergence, temperature=temperature, beta=beta, alpha=alpha)
    check_int("chunk_size", chunk_size, low=1)
    if softcap is not None:
        if not fused:
            raise ValueError(f"{name}: softcap applies to the fused path (fused=True), which projects the hidden states "
                             "itself; the logits path reads the models' logits, which already carry their cap")
        check_positive("softcap", softcap)
    check_roles(name, student, teacher)

    def compute(inputs: LossInputs, rng):
        targets, target_mask, normalizer = lm_targets(inputs.batch)
        if not fused:
            zs, zt = inputs.output(student, method=name).logits, inputs.target(teacher, method=name).logits
            return loss_fn(zs, zt, mask=full_length_mask(target_mask), normalizer=normalizer)
        s_hidden = hidden_states_of(inputs.output(student, method=name), student, name)
        t_hidden = hidden_states_of(inputs.target(teacher, method=name), teacher, name)
        s_head = output_projection_of(inputs, student, method=name)
        t_head = jax.lax.stop_gradient(output_projection_of(inputs, teacher, method=name))
        return losses.fused_linear_divergence(
            s_hidden, s_head, t_hidden, t_head, divergence=divergence, mask=target_mask.reshape(-1),
            normalizer=normalizer, chunk_size=chunk_size, softcap=softcap, **loss_fn.kwargs)

    return stateless_method(name, compute, weight=weight, participants=(student, teacher),
                            trained=(student,), batch_keys=LM_KEYS)
