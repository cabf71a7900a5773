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
    fused: bool | str = "auto",
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
        value and gradients. ``"auto"`` (default) takes the fused path where it is measured to pay
        (:func:`fused_pays`: at least two chunks of tokens and ``tokens × V >= 2**22``) and both models are
        jaxkd LMs whose hidden states and projections it can read and whose logits are not soft-capped
        (Gemma's are: the logits path then), the logits otherwise; the metric ``<name>/fused`` (1 or 0) says which ran.
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
    if fused not in (True, False, "auto"):
        raise ValueError(f"{name}: fused must be True, False or 'auto', got {fused!r}")
    if softcap is not None:
        if fused is not True:  # "auto" too: it takes the fused path only for uncapped models
            raise ValueError(f"{name}: softcap applies to the fused path (fused=True), which projects the hidden states "
                             "itself; the logits path reads the models' logits, which already carry their cap")
        check_positive("softcap", softcap)
    check_roles(name, student, teacher)

    def compute(inputs: LossInputs, rng):
        targets, target_mask, normalizer = lm_targets(inputs.batch)
        zs = inputs.output(student, method=name).logits
        use_fused = fused if fused != "auto" else (
            fused_pays(zs.shape[0] * zs.shape[1], zs.shape[-1], chunk_size)
            and all(_fusable(inputs, p, softcap, name) for p in (student, teacher)))
        flag = {"fused": jax.numpy.asarray(float(use_fused), jax.numpy.float32)}
        if not use_fused:
            zt = inputs.target(teacher, method=name).logits
            return loss_fn(zs, zt, mask=full_length_mask(target_mask), normalizer=normalizer), flag
        s_hidden = hidden_states_of(inputs.output(student, method=name), student, name)
        t_hidden = hidden_states_of(inputs.target(teacher, method=name), teacher, name)
        # Each head in its model's compute dtype (the hidden states' dtype), as the model's own logits cast it:
        # a float32 head times bfloat16 states would be a mixed-dtype product, XLA:CPU's slowest matmul.
        s_head = output_projection_of(inputs, student, method=name).astype(s_hidden.dtype)
        t_head = jax.lax.stop_gradient(output_projection_of(inputs, teacher, method=name)).astype(t_hidden.dtype)
        return losses.fused_linear_divergence(
            s_hidden, s_head, t_hidden, t_head, divergence=divergence, mask=target_mask.reshape(-1),
            normalizer=normalizer, chunk_size=chunk_size, softcap=softcap, **loss_fn.kwargs), flag

    return stateless_method(name, compute, weight=weight, participants=(student, teacher),
                            trained=(student,), batch_keys=LM_KEYS)


#: Below this many logits (tokens × vocabulary) per model the fused path does not pay: the whole logits fit
#: in the caches' reach and the chunk loop's overhead shows (benchmarks/fused_linear.py, docs/benchmarks.md).
FUSED_MIN_LOGITS = 2**22


def fused_pays(num_tokens: int, vocab_size: int, chunk_size: int) -> bool:
    """Whether ``token_kd(fused="auto")`` takes the fused path for ``num_tokens`` positions over ``vocab_size``
    classes: at least two chunks (one chunk is the unfused computation plus the loop) and at least
    :data:`FUSED_MIN_LOGITS` logits. Measured on a 2-core CPU, value and gradient of forward KL and the
    generalized JSD (``python benchmarks/fused_linear.py``): where both hold the fused path took 0.61–0.89×
    the unfused time, elsewhere 0.85–1.13×."""
    return num_tokens >= 2 * chunk_size and num_tokens * vocab_size >= FUSED_MIN_LOGITS


def _fusable(inputs: LossInputs, participant: str, softcap, method: str) -> bool:
    """Participant ``participant`` is a plain jaxkd LM (:class:`jaxkd.models.lm.TransformerLM` itself: a LoRA or
    int8 model, whose module qwix wraps, computes its logits with weights the projection in its parameters is
    not) whose final hidden states the step has and whose logits are ``hidden @ projection`` (no soft cap:
    ``softcap`` is None under ``"auto"``)."""
    from jaxkd.models.lm import TransformerLM

    try:
        model = inputs.participant(participant, method=method).model
    except ValueError:  # outputs without their model (LossInputs.of in a notebook): the logits path
        return False
    module = getattr(model, "module", None)
    return (type(module) is TransformerLM and module.config.final_softcap == softcap
            and inputs.output(participant, method=method).features.get("hidden") is not None)
