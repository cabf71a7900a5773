"""GKD as a method: on-policy distillation of LMs on a batch partly replaced by the student's own
continuations of its prompts, sampled inside the compiled train step (:mod:`jaxkd.methods.lm.rollout`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd.batch import MASK, TOKENS, batch_target_mask
from jaxkd import losses
from jaxkd.checks import check_in_range, check_int, check_nonnegative
from jaxkd.methods.base import LossInputs, Method, Weight, check_roles, stateless_method
from jaxkd.methods.features import apply_participant
from jaxkd.methods.lm.rollout import generate_continuations, generated_target_mask
from jaxkd.methods.registry import LOGIT_ROLES, register
from jaxkd.methods.lm.tokens import LM_KEYS, full_length_mask, lm_targets, token_divergence

__all__ = ["gkd"]


@register(
    "gkd", inputs="tokens", example="prompt_length=3",
    paper="Agarwal et al., *On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes* (GKD), ICLR 2024",
    losses=("generalized_jsd",),
    status="supported (student sampling inside the jitted step; `seq_kd`: the teacher samples)",
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
    seq_kd: bool = False,
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
    completion-only loss), on data rows the batch's targets (its completion tokens when it carries
    :data:`jaxkd.batch.LOSS_MASK`). ``λ = 0`` is exactly supervised token KD
    (:func:`jaxkd.methods.token_kd` with ``generalized_jsd``); ``λ = 1`` is fully on-policy.

    ``seq_kd=True`` is TRL's sequence-level branch (``GKDConfig.seq_kd``; Kim & Rush, "Sequence-Level Knowledge
    Distillation", 2016): the rows that are not on-policy are continued by the frozen *teacher* instead of
    keeping the dataset's completion — sampled in the step at ``sampling_temperature`` from the same prompts
    (TRL's ``training_step``: ``elif self.seq_kd``, the teacher's ``generate`` with the same generation config)
    — and the loss is over their generated tokens. With ``λ = 0`` every row is the teacher's.

    On data rows the targets are the batch's (:func:`jaxkd.batch.batch_target_mask`): a batch with
    :data:`jaxkd.batch.LOSS_MASK` (completion-only loss) scores only its completion tokens, TRL's
    ``labels = -100`` on the prompt; generated rows score the tokens after ``prompt_length``.

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
    if not isinstance(seq_kd, bool):
        raise ValueError(f"{name}: seq_kd must be True or False, got {seq_kd!r}")
    loss_fn = token_divergence("generalized_jsd", temperature=temperature, beta=beta)

    def continue_rows(inputs, participant, rows, rng):
        """``participant``'s continuations of ``rows``' prompts and their generated-target mask."""
        tokens, mask = inputs.batch[TOKENS][rows], inputs.batch[MASK][rows]
        gen_tokens, gen_mask = generate_continuations(
            inputs, participant, tokens, mask, rng, prompt_length=prompt_length, temperature=sampling_temperature,
            top_k=top_k, top_p=top_p, eos_id=eos_id, method=name)
        return gen_tokens.astype(tokens.dtype), gen_mask, generated_target_mask(gen_mask, prompt_length)

    def compute(inputs: LossInputs, rng):
        tokens, mask = inputs.batch[TOKENS], inputs.batch[MASK]
        batch = tokens.shape[0]
        num_generated = int(round(lmbda * batch))
        if num_generated == 0 and not seq_kd:
            _, target_mask, normalizer = lm_targets(inputs.batch)
            zs, zt = inputs.output(student, method=name).logits, inputs.target(teacher, method=name).logits
            return loss_fn(zs, zt, mask=full_length_mask(target_mask), normalizer=normalizer)
        student_rng, teacher_rng = rng, jax.random.fold_in(rng, 1)  # the student's draws as without seq_kd
        parts = []  # (tokens, mask, target mask) of the on-policy rows, then of the others
        if num_generated:
            parts.append(continue_rows(inputs, student, slice(0, num_generated), student_rng))
        rest = slice(num_generated, batch)
        if num_generated < batch and seq_kd:
            parts.append(continue_rows(inputs, teacher, rest, teacher_rng))
        elif num_generated < batch:
            # Data rows keep their targets: padding, packed-document boundaries and prompt tokens (LOSS_MASK)
            # excluded, as for every token method.
            _, data_targets = losses.next_token_targets(tokens[rest], mask[rest])
            data_targets = data_targets & batch_target_mask(inputs.batch, TOKENS, MASK)[rest]
            parts.append((tokens[rest], mask[rest], data_targets))
        mixed_tokens, mixed_mask, target_mask = (jnp.concatenate(arrays) for arrays in zip(*parts))
        x = {TOKENS: mixed_tokens, MASK: mixed_mask}
        student_logits = apply_participant(inputs, student, x, train=True, method=name).logits
        teacher_logits = jax.lax.stop_gradient(apply_participant(inputs, teacher, x, train=False, method=name).logits)
        value = loss_fn(student_logits, teacher_logits, mask=full_length_mask(target_mask))
        metrics = {"generated_fraction": jnp.asarray(num_generated / batch, jnp.float32),
                   "generated_tokens": jnp.sum(target_mask[:num_generated]).astype(jnp.float32)}
        if seq_kd:
            metrics["teacher_generated_tokens"] = jnp.sum(target_mask[num_generated:]).astype(jnp.float32)
        return value, metrics

    return stateless_method(name, compute, weight=weight, participants=(student, teacher),
                            trained=(student,), batch_keys=LM_KEYS)
