"""Preference distillation with the teacher as the DPO reference (LLaVA-MoD's second stage): the data
continuation is chosen, a student sample rejected. A row's first ``prompt_length`` tokens are the prompt."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd.batch import MASK, TOKENS, batch_target_mask
from jaxkd import losses
from jaxkd.checks import check_choice, check_int, check_positive
from jaxkd.losses.lm.tokens import shift_logits
from jaxkd.methods.base import LossInputs, Method, Weight, check_roles, stateless_method
from jaxkd.methods.features import apply_participant
from jaxkd.methods.lm.rollout import generated_target_mask, learner_rollout
from jaxkd.methods.registry import register
from jaxkd.methods.lm.tokens import LM_KEYS

__all__ = ["preference_kd"]


@register(
    "preference_kd", inputs="tokens", example="prompt_length=3",
    paper="Rafailov et al., *Direct Preference Optimization*, NeurIPS 2023, with the teacher as the reference (LLaVA-MoD)",
    losses=("dpo_loss", "kto_pair_loss", "sequence_log_probs"),
    status="supported (pairs: data continuation chosen, student sample rejected)",
)
def preference_kd(
    *,
    beta: float = 0.1,
    loss_type: str = "dpo",
    prompt_length: int = 16,
    sampling_temperature: float = 1.0,
    average_log_prob: bool = False,
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "preference_kd",
) -> Method:
    """Preference distillation: DPO (``loss_type="dpo"``, sigmoid) or paired KTO (``"kto_pair"``, the loss
    LLaVA-MoD's script selects) with the frozen **teacher as the reference model** (Shu et al., "LLaVA-MoD:
    Making LLaVA Tiny via MoE Knowledge Distillation", 2024). LLaVA-MoD reads chosen/rejected pairs from
    a preference data set (RLAIF-V); a corpus has none, so each row makes a pair in the step: the data
    continuation of its prompt is *chosen*, the student's own sampled continuation *rejected* (the
    self-play construction of SPIN, Chen et al. 2024). Response log-probabilities are summed over the
    continuation (``average_log_prob=True``: averaged, LLaVA-MoD's ``get_logp`` option). Metrics:
    ``reward_margin`` (β·(r_chosen − r_rejected)). A batch with :data:`jaxkd.batch.LOSS_MASK` also limits the
    chosen continuation to its completion tokens (and packed rows' :data:`~jaxkd.batch.SEGMENT_IDS` to one
    document's targets).

    ``student``/``teacher`` name the participants in the two roles, as in :func:`~jaxkd.methods.kd`: the
    participant in the ``student`` role samples the continuations and is trained; the one in the ``teacher``
    role is a gradient-stopped target (``preference_kd(student="peer", teacher="student")`` teaches a peer).
    """
    check_roles(name, student, teacher)
    check_positive("beta", beta)
    check_choice("loss_type", loss_type, ("dpo", "kto_pair"))
    check_int("prompt_length", prompt_length, low=1)

    def compute(inputs: LossInputs, rng):
        tokens, mask = inputs.batch[TOKENS], inputs.batch[MASK]
        rejected, rejected_targets_mask = learner_rollout(
            inputs, rng, prompt_length=prompt_length, temperature=sampling_temperature, top_k=None, top_p=None,
            eos_id=None, method=name, learner=student)
        chosen = {TOKENS: tokens, MASK: mask}
        # The data continuation after the prompt; with a completion mask (LOSS_MASK), its completion tokens only.
        chosen_targets_mask = generated_target_mask(mask, prompt_length) & batch_target_mask(inputs.batch)

        def logps(participant, x, target_mask, train):
            logits = apply_participant(inputs, participant, x, train=train, method=name).logits
            targets, _ = losses.next_token_targets(x[TOKENS], x[MASK])
            return losses.sequence_log_probs(shift_logits(logits), targets, target_mask, average=average_log_prob)

        policy_c = logps(student, chosen, chosen_targets_mask, True)
        policy_r = logps(student, rejected, rejected_targets_mask, True)
        ref_c = jax.lax.stop_gradient(logps(teacher, chosen, chosen_targets_mask, False))
        ref_r = jax.lax.stop_gradient(logps(teacher, rejected, rejected_targets_mask, False))
        valid = jnp.any(chosen_targets_mask, axis=-1) & jnp.any(rejected_targets_mask, axis=-1)
        if loss_type == "dpo":
            value = losses.dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=beta, mask=valid)
        else:
            value = losses.kto_pair_loss(policy_c, policy_r, ref_c, ref_r, beta=beta, mask=valid)
        margin = beta * ((policy_c - ref_c) - (policy_r - ref_r))
        return value, {"reward_margin": jnp.sum(jnp.where(valid, margin, 0.0)) / jnp.maximum(jnp.sum(valid), 1)}

    return stateless_method(name, compute, weight=weight, participants=(teacher,), trained=(student,),
                            batch_keys=LM_KEYS)
