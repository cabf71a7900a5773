"""GKD as a method: on-policy distillation of LMs on a batch partly replaced by the student's own
continuations of its prompts, sampled inside the compiled train step (:mod:`jaxkd.methods.lm.rollout`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd.batch import MASK, TOKENS
from jaxkd import losses
from jaxkd.checks import check_in_range, check_int, check_nonnegative
from jaxkd.losses.lm.tokens import shift_logits
from jaxkd.methods.base import LossInputs, Method, Weight, check_roles, stateless_method
from jaxkd.methods.features import apply_participant
from jaxkd.methods.lm.rollout import generate_continuations, generated_target_mask
from jaxkd.methods.registry import LOGIT_ROLES, register
from jaxkd.methods.lm.tokens import LM_KEYS, lm_targets, token_divergence

__all__ = ["gkd"]


@register(
    "gkd", inputs="tokens", example="prompt_length=3",
    paper="Agarwal et al., *On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes* (GKD), ICLR 2024",
    losses=("generalized_jsd",),
    status="supported (student sampling inside the jitted step)",
    contract=LOGIT_ROLES,
)
def gkd(
    *,
    lmbda: float = 0.5,
    beta: float = 0.5,
    temperature: float = 1.0,
    sampling_temperature: float = 0.9,
    top_k: int | None = None,
    top_p: float | None = None,
    prompt_length: int = 16,
    eos_id: int | None = None,
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "gkd",
) -> Method:
    """Generalized knowledge distillation (GKD) with on-policy data.

    A fraction ``λ`` of every batch (the first ``round(λ·B)`` rows) is replaced by the *student's* own
    continuations of the rows' first ``prompt_length`` tokens, sampled inside the step at
    ``sampling_temperature`` (TRL's default 0.9); teacher and student score the mixed batch and the loss is
    :func:`jaxkd.losses.generalized_jsd` per token with TRL's β (0 = forward KL, 1 = reverse KL; TRL's
    default 0.5), averaged over the targets: on generated rows the generated tokens only (TRL's
    completion-only loss), on data rows every target. ``λ = 0`` is exactly supervised token KD
    (:func:`jaxkd.methods.token_kd` with ``generalized_jsd``); ``λ = 1`` is fully on-policy.

    TRL (``GKDTrainer``) flips one coin per batch (on-policy with probability λ); a fixed fraction per
    batch has the same expectation and a lower variance, and keeps the compiled step's shapes static.
    The mean over a batch with generated rows is over *this* (micro-)batch's targets: how many tokens a
    generated row keeps (up to its EOS) is known only after sampling.

    ``student``/``teacher`` name the participants in the two roles, as in :func:`~jaxkd.methods.token_kd`:
    the participant in the ``student`` role samples the on-policy rows and learns; the teacher's logits on
    the mixed batch are a gradient-stopped target (``gkd(student="peer", teacher="student")`` never trains
    the student).
    """
    check_roles(name, student, teacher)
    check_in_range("lmbda", lmbda, 0.0, 1.0)
    check_nonnegative("sampling_temperature", sampling_temperature)  # 0 is greedy
    check_int("prompt_length", prompt_length, low=1)
    loss_fn = token_divergence("generalized_jsd", temperature=temperature, beta=beta)

    def compute(inputs: LossInputs, rng):
        tokens, mask = inputs.batch[TOKENS], inputs.batch[MASK]
        num_generated = int(round(lmbda * tokens.shape[0]))
        if num_generated == 0:
            _, target_mask, normalizer = lm_targets(inputs.batch)
            zs, zt = inputs.output(student, method=name).logits, inputs.target(teacher, method=name).logits
            return loss_fn(shift_logits(zs), shift_logits(zt), mask=target_mask, normalizer=normalizer)
        gen_tokens, gen_mask = generate_continuations(
            inputs, student, tokens[:num_generated], mask[:num_generated], rng, prompt_length=prompt_length,
            temperature=sampling_temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, method=name)
        mixed_tokens = jnp.concatenate([gen_tokens, tokens[num_generated:]]).astype(tokens.dtype)
        mixed_mask = jnp.concatenate([gen_mask, mask[num_generated:]])
        x = {TOKENS: mixed_tokens, MASK: mixed_mask}
        student_logits = apply_participant(inputs, student, x, train=True, method=name).logits
        teacher_logits = jax.lax.stop_gradient(apply_participant(inputs, teacher, x, train=False, method=name).logits)
        _, target_mask = losses.next_token_targets(mixed_tokens, mixed_mask)
        target_mask = target_mask.at[:num_generated].set(generated_target_mask(gen_mask, prompt_length))
        value = loss_fn(shift_logits(student_logits), shift_logits(teacher_logits), mask=target_mask)
        return value, {"generated_fraction": jnp.asarray(num_generated / tokens.shape[0], jnp.float32),
                       "generated_tokens": jnp.sum(target_mask[:num_generated]).astype(jnp.float32)}

    return stateless_method(name, compute, weight=weight, participants=(student, teacher),
                            trained=(student,), batch_keys=LM_KEYS)
