"""LM distillation on the student's own sequences and on preferences: DistiLLM's adaptive off-policy
skew KL, LLaVA-MoD's mimic-then-preference recipe, ADPA's advantage-guided distillation and MGSR's
DAC-KL. Sampling happens inside the compiled step (:func:`jaxkd.methods.gkd.generate_continuations`).

Sequences: a batch row's first ``prompt_length`` tokens are the prompt; "the data continuation" is the
rest of the row; a student continuation is sampled to the row's length.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_choice, check_in_range, check_int, check_nonnegative, check_positive
from jaxkd.losses.distillm import DistiLLMSchedule
from jaxkd.losses.tokens import shift_logits
from jaxkd.methods.base import (LossAux, LossInputs, Method, MethodVars, Weight, after, chain, multiply_weights,
                                stateless_method, until)
from jaxkd.methods.features import apply_participant
from jaxkd.methods.gkd import _generated_target_mask, generate_continuations
from jaxkd.methods.registry import register
from jaxkd.methods.tokens import _LM_KEYS, lm_targets, token_divergence, token_kd

__all__ = ["adpa", "dac_kl", "distillm", "llava_mod", "minillm", "observe_validation_loss", "preference_kd"]


def _student_rollout(inputs: LossInputs, rng, *, prompt_length, temperature, top_k, top_p, eos_id, method):
    """The batch with every row continued by the student after its prompt: ``(x, generated target mask)``."""
    tokens, mask = inputs.batch["tokens"], inputs.batch["mask"]
    gen_tokens, gen_mask = generate_continuations(
        inputs, "student", tokens, mask, rng, prompt_length=prompt_length, temperature=temperature, top_k=top_k,
        top_p=top_p, eos_id=eos_id, method=method)
    return {"tokens": gen_tokens.astype(tokens.dtype), "mask": gen_mask}, _generated_target_mask(gen_mask, prompt_length)


# ----- MiniLLM -----


@register(
    "minillm", inputs="tokens", example="prompt_length=3",
    paper="Gu et al., *MiniLLM: Knowledge Distillation of Large Language Models*, ICLR 2024",
    losses=("minillm", "minillm_mixture_log_probs"),
    status="supported (teacher-mixed sampling inside the step; one policy update per rollout)",
)
def minillm(
    *,
    prompt_length: int = 16,
    teacher_mix_alpha: float = 0.2,
    sampling_temperature: float = 1.0,
    gamma: float = 0.95,
    clip_range: float = 0.2,
    single_step: bool = True,
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "minillm",
) -> Method:
    """MiniLLM's reverse-KL policy gradient on sequences sampled in the step.

    Every row's prompt is continued by the **teacher-mixed** policy ``(1 − α)·q_θ + α·p`` (α = 0.2, the
    official ``mix_in_alpha``; 0 samples from the student alone) — the student and the teacher decoded
    together with one KV cache each (:func:`jaxkd.models.fusion.fused_generate`) — and the loss is
    :func:`jaxkd.losses.minillm` on the generated tokens: the clipped policy-gradient surrogate with
    length-normalized, discounted rewards ``log p − log q``, importance weights from the mixture, plus the
    single-step reverse KL. The official trainer reuses a rollout for several PPO epochs; here each step
    samples fresh sequences and makes one update from them (the ratio is 1 at the update, so the clip is
    inactive). Combine with ``lm_ce`` (the official pretraining-loss term).
    """
    check_int("prompt_length", prompt_length, low=1)
    check_in_range("teacher_mix_alpha", teacher_mix_alpha, 0.0, 1.0)
    check_nonnegative("sampling_temperature", sampling_temperature)

    def compute(inputs: LossInputs, rng):
        from jaxkd.methods.features import participant_variables
        from jaxkd.methods.gkd import _lm_config
        from jaxkd.models.fusion import fused_generate

        tokens, mask = inputs.batch["tokens"], inputs.batch["mask"]
        length = tokens.shape[1]
        if not 1 <= prompt_length < length:
            raise ValueError(f"{name!r}: prompt_length must lie in [1, {length}), got {prompt_length}")
        members = [(_lm_config(inputs, who, name), participant_variables(inputs, who, method=name)["params"])
                   for who in ("student", teacher)]
        out = fused_generate(members, _TeacherMix(teacher_mix_alpha), tokens[:, :prompt_length],
                             mask[:, :prompt_length], rng=rng, max_new_tokens=length - prompt_length,
                             temperature=sampling_temperature)
        x = {"tokens": jax.lax.stop_gradient(out.tokens).astype(tokens.dtype), "mask": out.mask}
        target_mask = _generated_target_mask(out.mask, prompt_length)
        s = apply_participant(inputs, "student", x, train=True, method=name).logits
        t = jax.lax.stop_gradient(apply_participant(inputs, teacher, x, train=False, method=name).logits)
        targets, _ = losses.next_token_targets(x["tokens"], x["mask"])
        # The behaviour log-probs of the generated tokens sit at the positions that predicted them.
        behaviour = jnp.zeros(targets.shape, jnp.float32).at[:, prompt_length - 1:].set(out.log_probs)
        pg, single = losses.minillm_terms(
            shift_logits(s), shift_logits(t), targets, target_mask, behaviour_log_probs=behaviour,
            teacher_mix_alpha=teacher_mix_alpha if teacher_mix_alpha > 0 else None, gamma=gamma,
            clip_range=clip_range)
        return pg + (single if single_step else 0.0), {"pg": pg, "single_step": single}

    return stateless_method(name, compute, weight=weight, needs_teacher=teacher == "teacher", participants=(teacher,),
                            batch_keys=_LM_KEYS)


class _TeacherMix:
    """``combine`` for :func:`fused_generate`: the log-probabilities of ``(1 − α)·q_student + α·p_teacher``.
    A hashable callable (``fused_generate`` takes ``combine`` as a static argument)."""

    def __init__(self, alpha: float):
        self.alpha = float(alpha)

    def __call__(self, logits):
        student_logits, teacher_logits = logits
        return losses.minillm_mixture_log_probs(student_logits, teacher_logits, alpha=self.alpha)

    def __eq__(self, other):
        return isinstance(other, _TeacherMix) and other.alpha == self.alpha

    def __hash__(self):
        return hash(("teacher_mix", self.alpha))


# ----- DistiLLM -----


@register(
    "distillm", inputs="tokens", example="prompt_length=3, init_threshold=1.0",
    paper="Ko et al., *DistiLLM: Towards Streamlined Distillation for Large Language Models*, ICML 2024",
    losses=("skew_kl", "skew_reverse_kl", "distillm_schedule_update", "distillm_data_source"),
    status="supported (adaptive SGO in the step; no replay buffer, see docstring)",
)
def distillm(
    *,
    divergence: str = "skew_kl",
    alpha: float = 0.1,
    prompt_length: int = 16,
    init_threshold: float = 0.0,
    sampling_temperature: float = 1.0,
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "distillm",
) -> Method:
    """DistiLLM: skew KL (``"skew_kl"``, α = 0.1) or skew reverse KL per token, on the dataset batch or —
    with the adaptive probability ``p`` — on the student's own continuations of the batch's prompts,
    sampled in the step (adaptive student-generated outputs, :mod:`jaxkd.losses.distillm`).

    ``p`` lives in the method state; it rises by 0.1 each time the validation loss rises by ``loss_eps``
    (0.1) over the loss of its last rise: call :func:`observe_validation_loss` after each evaluation (the
    official loop evaluates once per epoch). Each step draws ``r ∼ U(0, 1)`` and trains on a fresh
    student generation when ``r < p`` (a ``lax.cond``: only the chosen branch runs). The official replay
    buffer — which lets a full buffer replace some fresh generations by old ones, to save generation time
    — is not kept: every student-output step samples fresh sequences (the on-policy limit of the
    schedule). Metrics: ``p``, ``student_output`` (1 on a generated step).
    """
    check_choice("divergence", divergence, ("skew_kl", "skew_reverse_kl"))
    check_int("prompt_length", prompt_length, low=1)
    check_in_range("init_threshold", init_threshold, 0.0, 1.0)
    check_nonnegative("sampling_temperature", sampling_temperature)
    loss_fn = token_divergence(divergence, alpha=alpha)

    def init(rng, inputs: LossInputs) -> MethodVars:
        return MethodVars(state=losses.distillm_schedule_init(init_threshold))

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        schedule = vars.state
        choice_rng, sample_rng = jax.random.split(rng)
        use_student = jax.random.uniform(choice_rng) < schedule.threshold

        def on_data(_):
            _, target_mask, normalizer = lm_targets(inputs.batch)
            zs, zt = inputs.output("student", method=name).logits, inputs.target(teacher, method=name).logits
            return loss_fn(shift_logits(zs), shift_logits(zt), mask=target_mask, normalizer=normalizer)

        def on_student_outputs(_):
            x, target_mask = _student_rollout(inputs, sample_rng, prompt_length=prompt_length,
                                              temperature=sampling_temperature, top_k=None, top_p=None, eos_id=None,
                                              method=name)
            s = apply_participant(inputs, "student", x, train=True, method=name).logits
            t = jax.lax.stop_gradient(apply_participant(inputs, teacher, x, train=False, method=name).logits)
            return loss_fn(shift_logits(s), shift_logits(t), mask=target_mask)

        value = jax.lax.cond(use_student, on_student_outputs, on_data, None)
        metrics = {"p": schedule.threshold, "student_output": use_student.astype(jnp.float32)}
        return value, LossAux(metrics, schedule)

    return Method(name=name, loss=loss, init=init, weight=weight, needs_teacher=teacher == "teacher",
                  participants=(teacher,), batch_keys=_LM_KEYS)


def observe_validation_loss(state, validation_loss: float, *, loss_eps: float = 0.1):
    """The train state with every DistiLLM schedule of its method updated by a validation loss
    (:func:`jaxkd.losses.distillm_schedule_update`, official ``--loss-eps`` 0.1); other methods' state is
    unchanged. Host-side, after an evaluation."""
    method_state = dict(state.method_vars.state)
    for name, current in method_state.items():
        if isinstance(current, DistiLLMSchedule):
            method_state[name] = losses.distillm_schedule_update(current, validation_loss, loss_eps=loss_eps)
    return state.replace(method_vars=state.method_vars.replace(state=method_state))


# ----- LLaVA-MoD: mimic, then preference distillation with the teacher as reference -----


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
    ``reward_margin`` (β·(r_chosen − r_rejected)).
    """
    check_positive("beta", beta)
    check_choice("loss_type", loss_type, ("dpo", "kto_pair"))
    check_int("prompt_length", prompt_length, low=1)

    def compute(inputs: LossInputs, rng):
        tokens, mask = inputs.batch["tokens"], inputs.batch["mask"]
        rejected, rejected_targets_mask = _student_rollout(
            inputs, rng, prompt_length=prompt_length, temperature=sampling_temperature, top_k=None, top_p=None,
            eos_id=None, method=name)
        chosen = {"tokens": tokens, "mask": mask}
        chosen_targets_mask = _generated_target_mask(mask, prompt_length)

        def logps(participant, x, target_mask, train):
            logits = apply_participant(inputs, participant, x, train=train, method=name).logits
            targets, _ = losses.next_token_targets(x["tokens"], x["mask"])
            return losses.sequence_log_probs(shift_logits(logits), targets, target_mask, average=average_log_prob)

        policy_c = logps("student", chosen, chosen_targets_mask, True)
        policy_r = logps("student", rejected, rejected_targets_mask, True)
        ref_c = jax.lax.stop_gradient(logps(teacher, chosen, chosen_targets_mask, False))
        ref_r = jax.lax.stop_gradient(logps(teacher, rejected, rejected_targets_mask, False))
        valid = jnp.any(chosen_targets_mask, axis=-1) & jnp.any(rejected_targets_mask, axis=-1)
        if loss_type == "dpo":
            value = losses.dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=beta, mask=valid)
        else:
            value = losses.kto_pair_loss(policy_c, policy_r, ref_c, ref_r, beta=beta, mask=valid)
        margin = beta * ((policy_c - ref_c) - (policy_r - ref_r))
        return value, {"reward_margin": jnp.sum(jnp.where(valid, margin, 0.0)) / jnp.maximum(jnp.sum(valid), 1)}

    return stateless_method(name, compute, weight=weight, needs_teacher=teacher == "teacher", participants=(teacher,),
                            batch_keys=_LM_KEYS)


@register(
    "llava_mod", inputs="tokens", example="mimic_steps=0, prompt_length=3",
    paper="Shu et al., *LLaVA-MoD: Making LLaVA Tiny via MoE Knowledge Distillation*, 2024",
    losses=("forward_kl", "dpo_loss", "kto_pair_loss"),
    status="supported (two stages in one state; self-made preference pairs, see preference_kd)",
)
def llava_mod(
    *,
    mimic_steps: int,
    beta: float = 0.1,
    loss_type: str = "dpo",
    prompt_length: int = 16,
    preference_weight: float = 1.0,
    teacher: str = "teacher",
    name: str = "llava_mod",
) -> Method:
    """LLaVA-MoD's recipe as one method: **mimic distillation** — next-token CE plus the forward KL from
    the teacher per token — for ``mimic_steps``, then **preference distillation** —
    :func:`preference_kd` (DPO with the teacher as reference) plus the CE — for the rest. The stages are
    :func:`until` / :func:`after` weights in one chain, so one train state and one compiled step run both
    (two programs' worth of work, only the active stage's terms count)."""
    check_int("mimic_steps", mimic_steps, low=0)
    check_nonnegative("preference_weight", preference_weight)
    from jaxkd.methods.tokens import lm_ce

    mimic = until(mimic_steps) * token_kd(divergence="forward_kl", teacher=teacher, name="mimic")
    preference = preference_kd(beta=beta, loss_type=loss_type, prompt_length=prompt_length, teacher=teacher,
                               name="preference", weight=multiply_weights(preference_weight, after(mimic_steps)))
    return chain(lm_ce(), mimic, preference, name=name)


# ----- ADPA -----


@register(
    "adpa", inputs="tokens", example="prompt_length=3",
    paper="Gao et al., *Advantage-Guided Distillation for Preference Alignment in Small Language Models*, ICLR 2025",
    losses=("adpa", "adpa_advantages"),
    status="supported (advantage from a preference-tuned teacher and its reference; on student samples)",
)
def adpa(
    *,
    teacher: str = "teacher",
    reference: str = "reference",
    top_k: int | None = None,
    prompt_length: int = 16,
    sampling_temperature: float = 1.0,
    weight: Weight = 1.0,
    name: str = "adpa",
) -> Method:
    """ADPA: on the student's own continuations (sampled in the step), ``−Σ_v π_θ(v)·A(v)`` per generated
    token with the advantage ``A = log π_teacher − log π_reference`` of a preference-tuned teacher over its
    reference (:func:`jaxkd.losses.adpa`; ``top_k`` keeps the advantage at the teacher's top-k
    entries, official 50). The two teachers are participants ``teacher`` and ``reference`` of the train
    state. Combine with ``lm_ce`` and/or a KL term (DCKD) as the paper does."""
    check_int("prompt_length", prompt_length, low=1)
    if top_k is not None:
        check_int("top_k", top_k, low=1)

    def compute(inputs: LossInputs, rng):
        x, target_mask = _student_rollout(inputs, rng, prompt_length=prompt_length, temperature=sampling_temperature,
                                          top_k=None, top_p=None, eos_id=None, method=name)
        s = apply_participant(inputs, "student", x, train=True, method=name).logits
        t = jax.lax.stop_gradient(apply_participant(inputs, teacher, x, train=False, method=name).logits)
        r = jax.lax.stop_gradient(apply_participant(inputs, reference, x, train=False, method=name).logits)
        return losses.adpa(shift_logits(s), shift_logits(t), shift_logits(r), top_k=top_k, mask=target_mask)

    return stateless_method(name, compute, weight=weight, needs_teacher=teacher == "teacher",
                            participants=(teacher, reference), batch_keys=_LM_KEYS)


# ----- DAC-KL (MGSR) -----


def identifier_spans(tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Span ids of byte tokens: maximal runs of identifier bytes (``[A-Za-z0-9_]``) — the word-level
    spans of source code, standing in for MGSR's phrase chunker — numbered per row; ``-1`` elsewhere."""
    t = tokens
    ident = ((t >= ord("a")) & (t <= ord("z"))) | ((t >= ord("A")) & (t <= ord("Z"))) | \
            ((t >= ord("0")) & (t <= ord("9"))) | (t == ord("_"))
    ident = ident & mask
    starts = ident & ~jnp.pad(ident[:, :-1], ((0, 0), (1, 0)))
    return jnp.where(ident, jnp.cumsum(starts, axis=1) - 1, -1)


@register(
    "dac_kl", inputs="tokens",
    paper="Liu et al., *Multi-Granularity Semantic Revision for Large Language Model Distillation*, 2024",
    losses=("dac_kl", "span_correlation_loss"),
    status="assumed form: the paper's Eq. 6/10 and code are unreachable (fixed quantile clipping; see the loss)",
)
def dac_kl(
    *,
    lower: float = 0.0,
    upper: float = 0.99,
    span_weight: float = 1.0,
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "dac_kl",
) -> Method:
    """MGSR's token and span terms, in the forms :mod:`jaxkd.losses.dac_kl` assumes: the forward KL on the
    teacher's distribution clipped to its ``[lower, upper]`` probability quantiles (fixed bounds, not the
    learned sub-network), plus ``span_weight`` × the span-level correlation loss over identifier spans of
    byte tokens (:func:`identifier_spans`). Combine with ``lm_ce`` (the paper's SFT term).
    Metrics: ``span``."""
    check_in_range("lower", lower, 0.0, 1.0)
    check_in_range("upper", upper, lower, 1.0)
    check_nonnegative("span_weight", span_weight)

    def compute(inputs: LossInputs, rng):
        _, target_mask, normalizer = lm_targets(inputs.batch)
        s = shift_logits(inputs.output("student", method=name).logits)
        t = shift_logits(inputs.target(teacher, method=name).logits)
        token_term = losses.dac_kl(s, t, lower=lower, upper=upper, mask=target_mask, normalizer=normalizer)
        spans = identifier_spans(inputs.batch["tokens"][:, 1:], target_mask)  # the spans of the targets
        span_term = losses.span_correlation_loss(s, t, spans, target_mask)
        return token_term + span_weight * span_term, {"span": span_term}

    return stateless_method(name, compute, weight=weight, needs_teacher=teacher == "teacher", participants=(teacher,),
                            batch_keys=_LM_KEYS)
