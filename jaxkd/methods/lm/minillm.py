"""MiniLLM as a method: on-policy reverse-KL policy gradient on student (teacher-mixed) samples, generated
inside the compiled step (:func:`jaxkd.methods.generate_continuations`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd.batch import MASK, TOKENS
from jaxkd import losses
from jaxkd.checks import check_in_range, check_int, check_nonnegative
from jaxkd.losses.lm.tokens import shift_logits
from jaxkd.methods.base import LossInputs, Method, Weight, check_roles, stateless_method
from jaxkd.methods.features import apply_participant
from jaxkd.methods.lm.rollout import generated_target_mask
from jaxkd.methods.registry import register
from jaxkd.methods.lm.tokens import LM_KEYS

__all__ = ["minillm"]


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
    student: str = "student",
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

    ``student``/``teacher`` name the participants in the two roles, as in :func:`~jaxkd.methods.kd`: the
    participant in the ``student`` role samples the continuations and is trained; the one in the ``teacher``
    role is a gradient-stopped target (``minillm(student="peer", teacher="student")`` teaches a peer).
    """
    check_roles(name, student, teacher)
    check_int("prompt_length", prompt_length, low=1)
    check_in_range("teacher_mix_alpha", teacher_mix_alpha, 0.0, 1.0)
    check_nonnegative("sampling_temperature", sampling_temperature)

    def compute(inputs: LossInputs, rng):
        from jaxkd.methods.features import participant_variables
        from jaxkd.methods.lm.rollout import lm_config_of
        from jaxkd.models.fusion import fused_generate

        tokens, mask = inputs.batch[TOKENS], inputs.batch[MASK]
        length = tokens.shape[1]
        if not 1 <= prompt_length < length:
            raise ValueError(f"{name!r}: prompt_length must lie in [1, {length}), got {prompt_length}")
        members = [(lm_config_of(inputs, who, name), participant_variables(inputs, who, method=name)["params"])
                   for who in (student, teacher)]
        out = fused_generate(members, _TeacherMix(teacher_mix_alpha), tokens[:, :prompt_length],
                             mask[:, :prompt_length], rng=rng, max_new_tokens=length - prompt_length,
                             temperature=sampling_temperature)
        x = {TOKENS: jax.lax.stop_gradient(out.tokens).astype(tokens.dtype), MASK: out.mask}
        target_mask = generated_target_mask(out.mask, prompt_length)
        s = apply_participant(inputs, student, x, train=True, method=name).logits
        t = jax.lax.stop_gradient(apply_participant(inputs, teacher, x, train=False, method=name).logits)
        targets, _ = losses.next_token_targets(x[TOKENS], x[MASK])
        # The behaviour log-probs of the generated tokens sit at the positions that predicted them.
        behaviour = jnp.zeros(targets.shape, jnp.float32).at[:, prompt_length - 1:].set(out.log_probs)
        pg, single = losses.minillm_terms(
            shift_logits(s), shift_logits(t), targets, target_mask, behaviour_log_probs=behaviour,
            teacher_mix_alpha=teacher_mix_alpha if teacher_mix_alpha > 0 else None, gamma=gamma,
            clip_range=clip_range)
        return pg + (single if single_step else 0.0), {"pg": pg, "single_step": single}

    return stateless_method(name, compute, weight=weight, participants=(teacher,), trained=(student,),
                            batch_keys=LM_KEYS)


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
