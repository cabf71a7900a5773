"""DistiLLM as a method: the adaptive off-policy skew KL (student-generated or data continuations, chosen by
a schedule the validation loss updates: :func:`observe_validation_loss`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_choice, check_in_range, check_int, check_nonnegative
from jaxkd.losses.lm.distillm import DistiLLMSchedule
from jaxkd.losses.lm.tokens import shift_logits
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight
from jaxkd.methods.features import apply_participant
from jaxkd.methods.lm.gkd import _student_rollout
from jaxkd.methods.registry import register
from jaxkd.methods.lm.tokens import _LM_KEYS, lm_targets, token_divergence

__all__ = ["distillm", "observe_validation_loss"]


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
    sampled in the step (adaptive student-generated outputs, :mod:`jaxkd.losses.lm.distillm`).

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

    return Method(name=name, loss=loss, init=init, weight=weight,
                  needs=Needs(participants=(teacher,), batch_keys=_LM_KEYS))


def observe_validation_loss(state, validation_loss: float, *, loss_eps: float = 0.1):
    """The train state with every DistiLLM schedule of its method updated by a validation loss
    (:func:`jaxkd.losses.distillm_schedule_update`, official ``--loss-eps`` 0.1); other methods' state is
    unchanged. Host-side, after an evaluation."""
    method_state = dict(state.method_vars.state)
    for name, current in method_state.items():
        if isinstance(current, DistiLLMSchedule):
            method_state[name] = losses.distillm_schedule_update(current, validation_loss, loss_eps=loss_eps)
    return state.replace(method_vars=state.method_vars.replace(state=method_state))
