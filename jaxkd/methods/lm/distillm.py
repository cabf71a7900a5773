"""DistiLLM as a method: the adaptive off-policy skew KL, on student-generated or data continuations chosen
by a schedule the validation loss updates (:func:`observe_validation_loss`), and that schedule.

Ko, Kim, Chen & Yun, "DistiLLM: Towards Streamlined Distillation for Large Language Models" (ICML 2024).
DistiLLM's loss is the skew KL per token — :func:`jaxkd.losses.skew_kl` / :func:`jaxkd.losses.skew_reverse_kl`
— and what this module adds is *which sequences* it is computed on: at every step the batch is either the
dataset's own (teacher/ground-truth responses), fresh student generations, or student generations
replayed from a buffer, with a probability of using student outputs that rises when the validation loss
rises. Transcribed from the official code, ``jongwooko/distillm`` ``finetune.py`` (``finetune``) with the
defaults of ``arguments.py`` (``--init-threshold 0.0``, ``--loss-eps 0.1``, ``--capacity 1000``,
``--replay-ratio decreasing``; the released ``scripts/*/distillm/*.sh`` use the same values,
``--type adaptive-sfkl`` or ``adaptive-srkl``):

* **State** (:class:`DistiLLMSchedule`): the threshold ``p`` (the probability of using student outputs)
  and the validation loss it was last raised at. Before training the official loop evaluates once:
  ``prev = L_val(0)``, ``p = init_threshold``.
* **Update** after each evaluation (:func:`distillm_schedule_update`; the official loop evaluates once per
  epoch — ``--eval-interval -1`` means one epoch): if ``L_val ≥ prev + ε`` then ``p ← min(p + 0.1, 1)``
  and ``prev ← L_val``; otherwise nothing changes (``prev`` is *not* updated, so a slow drift up
  accumulates until it exceeds ``ε``).
* **Per step** (:func:`distillm_data_source`), with ``r ∼ U(0, 1)`` and the replay threshold
  ``p_s = p·(1 − step/total_steps)`` (``decreasing``; ``constant``: ``p/2``; ``increasing``:
  ``p·step/total_steps``): if ``r < p_s`` or (``r < p`` and the buffer holds fewer than ``capacity``
  sequences) — generate fresh student outputs, train on them and push them into the buffer; else if
  ``r < p`` — train on a batch sampled uniformly, without replacement, from the buffer; else — train on
  the dataset batch.

**The replay buffer is needed** to reproduce the official schedule: once it is full, the probability of
fresh generation falls to ``p_s`` and ``p − p_s`` of the steps replay old generations (this is the
"off-policy" part; without a buffer every student-output step would be a fresh generation). The official
``ReplayBuffer`` is a FIFO ``deque(maxlen=capacity)`` of *sequences* (input ids, attention mask, position
ids, labels, loss mask), filled per example from each generated batch, sampled with
``random.sample(k=batch_size)``. It holds token ids, not arrays of the step: keep it on the host, next to
the generation loop (this module has the pure decisions only).

The official code also has a non-adaptive ``mixed`` mode (``r < --mixed-alpha`` ⇒ generate, push, and train
on a batch drawn from the buffer); it is not implemented here.
"""

from __future__ import annotations

from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp

from jaxkd.checks import check_choice, check_in_range, check_int, check_nonnegative, check_number, check_positive
from jaxkd.losses.core import Array
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight, check_roles
from jaxkd.methods.features import apply_participant
from jaxkd.methods.lm.rollout import learner_rollout
from jaxkd.methods.registry import register
from jaxkd.methods.lm.tokens import LM_KEYS, full_length_mask, lm_targets, token_divergence

__all__ = [
    "DISTILLM_DATASET",
    "DISTILLM_GENERATE",
    "DISTILLM_REPLAY",
    "DistiLLMSchedule",
    "distillm",
    "distillm_data_source",
    "distillm_sampling_thresholds",
    "distillm_schedule_init",
    "distillm_schedule_update",
    "distillm_use_student_output",
    "observe_validation_loss",
]

#: :func:`distillm_data_source` codes: train on the dataset batch, on fresh student generations (and push
#: them into the replay buffer), or on a batch sampled from the replay buffer.
DISTILLM_DATASET, DISTILLM_GENERATE, DISTILLM_REPLAY = 0, 1, 2

ReplayRatio = Literal["decreasing", "constant", "increasing"]


@flax.struct.dataclass
class DistiLLMSchedule:
    """The adaptive threshold ``p`` (probability of training on student outputs), the validation loss of
    its last increase, and whether that loss has been recorded yet."""

    threshold: Array
    prev_loss: Array
    initialized: Array


def distillm_schedule_init(
    init_threshold: float = 0.0, initial_validation_loss: float | Array | None = None
) -> DistiLLMSchedule:
    """The schedule before training: ``p = init_threshold`` (``--init-threshold``, 0.0).

    ``initial_validation_loss`` is the validation loss before the first step, which the official loop
    evaluates; without it, the first :func:`distillm_schedule_update` records its loss and leaves ``p``.
    """
    check_in_range("init_threshold", init_threshold, 0.0, 1.0)
    known = initial_validation_loss is not None
    if known:
        check_number("initial_validation_loss", initial_validation_loss)
    return DistiLLMSchedule(
        threshold=jnp.asarray(init_threshold, jnp.float32),
        prev_loss=jnp.asarray(initial_validation_loss if known else 0.0, jnp.float32),
        initialized=jnp.asarray(known),
    )


def distillm_schedule_update(
    state: DistiLLMSchedule,
    validation_loss: float | Array,
    *,
    loss_eps: float = 0.1,
    step_size: float = 0.1,
    max_threshold: float = 1.0,
) -> DistiLLMSchedule:
    """The official rule after an evaluation with loss ``L``: if ``L ≥ prev + loss_eps`` then
    ``p ← min(p + step_size, max_threshold)`` and ``prev ← L``; else unchanged.

    ``loss_eps`` is ``--loss-eps`` (0.1); ``step_size`` 0.1 and ``max_threshold`` 1.0 are constants of the
    official code. Jittable (``L`` may be traced). An uninitialized state records ``L`` and keeps ``p``.
    """
    check_number("loss_eps", loss_eps)
    check_positive("step_size", step_size)
    check_in_range("max_threshold", max_threshold, 0.0, 1.0)
    loss = jax.lax.stop_gradient(jnp.asarray(validation_loss, jnp.float32))
    raise_ = state.initialized & (loss >= state.prev_loss + loss_eps)
    return DistiLLMSchedule(
        threshold=jnp.where(raise_, jnp.minimum(state.threshold + step_size, max_threshold), state.threshold),
        prev_loss=jnp.where(raise_ | ~state.initialized, loss, state.prev_loss),
        initialized=jnp.ones((), bool),
    )


def distillm_sampling_thresholds(
    state: DistiLLMSchedule, step: int | Array, *, total_steps: int, replay_ratio: ReplayRatio = "decreasing"
) -> tuple[Array, Array]:
    """``(p_s, p)``: the fresh-generation threshold and the student-output threshold at ``step``.

    ``p_s = p·(1 − step/total_steps)`` (``decreasing``, the default), ``p/2`` (``constant``) or
    ``p·step/total_steps`` (``increasing``) — ``--replay-ratio``. ``step`` is the official ``global_step``:
    1 at the first optimizer step (pass ``state.step + 1`` for a 0-based counter).
    """
    check_int("total_steps", total_steps, low=1)
    check_choice("replay_ratio", replay_ratio, ("decreasing", "constant", "increasing"))
    p = state.threshold
    frac = jnp.asarray(step, jnp.float32) / total_steps
    if replay_ratio == "constant":
        fresh = p * 0.5
    elif replay_ratio == "increasing":
        fresh = p * frac
    else:
        fresh = p * (1.0 - frac)
    return fresh, p


def distillm_data_source(
    state: DistiLLMSchedule,
    rng: Array,
    step: int | Array,
    buffer_size: int | Array,
    *,
    total_steps: int,
    capacity: int = 1000,
    replay_ratio: ReplayRatio = "decreasing",
) -> Array:
    """Where this step's batch comes from (int32 scalar): :data:`DISTILLM_GENERATE`,
    :data:`DISTILLM_REPLAY` or :data:`DISTILLM_DATASET`, by the official rule with ``r = uniform(rng)``.

    ``GENERATE`` if ``r < p_s`` or (``r < p`` and ``buffer_size < capacity``); else ``REPLAY`` if ``r < p``;
    else ``DATASET``. ``buffer_size`` is the number of sequences in the replay buffer before this step;
    ``capacity`` is ``--capacity`` (1000). ``step`` as :func:`distillm_sampling_thresholds`. Jittable.
    """
    check_int("capacity", capacity, low=1)
    fresh, p = distillm_sampling_thresholds(state, step, total_steps=total_steps, replay_ratio=replay_ratio)
    r = jax.random.uniform(rng, (), jnp.float32)
    filling = jnp.asarray(buffer_size) < capacity
    generate = (r < fresh) | ((r < p) & filling)
    replay = ~generate & (r < p)
    return jnp.where(generate, DISTILLM_GENERATE, jnp.where(replay, DISTILLM_REPLAY, DISTILLM_DATASET)).astype(jnp.int32)


def distillm_use_student_output(
    state: DistiLLMSchedule,
    rng: Array,
    step: int | Array,
    buffer_size: int | Array,
    *,
    total_steps: int,
    capacity: int = 1000,
    replay_ratio: ReplayRatio = "decreasing",
) -> Array:
    """Whether this step trains on student outputs (fresh or replayed): ``r < p`` with the same ``r`` as
    :func:`distillm_data_source` for the same ``rng``."""
    source = distillm_data_source(
        state, rng, step, buffer_size, total_steps=total_steps, capacity=capacity, replay_ratio=replay_ratio
    )
    return source != DISTILLM_DATASET


@register(
    "distillm", inputs="tokens", example="prompt_length=3, init_threshold=1.0",
    paper="Ko et al., *DistiLLM: Towards Streamlined Distillation for Large Language Models*, ICML 2024",
    losses=("skew_kl", "skew_reverse_kl"),
    status="supported (adaptive SGO in the step; no replay buffer, see docstring)",
)
def distillm(
    *,
    divergence: str = "skew_kl",
    alpha: float = 0.1,
    prompt_length: int = 16,
    init_threshold: float = 0.0,
    sampling_temperature: float = 1.0,
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "distillm",
) -> Method:
    """DistiLLM: skew KL (``"skew_kl"``, α = 0.1) or skew reverse KL per token, on the dataset batch or —
    with the adaptive probability ``p`` — on the student's own continuations of the batch's prompts,
    sampled in the step (adaptive student-generated outputs, the schedule above).

    ``p`` lives in the method state; it rises by 0.1 each time the validation loss rises by ``loss_eps``
    (0.1) over the loss of its last rise: call :func:`observe_validation_loss` after each evaluation (the
    official loop evaluates once per epoch). Each step draws ``r ∼ U(0, 1)`` and trains on a fresh
    student generation when ``r < p`` (a ``lax.cond``: only the chosen branch runs). The official replay
    buffer — which lets a full buffer replace some fresh generations by old ones, to save generation time
    — is not kept: every student-output step samples fresh sequences (the on-policy limit of the
    schedule). Metrics: ``p``, ``student_output`` (1 on a generated step).

    ``student``/``teacher`` name the participants in the two roles, as in :func:`~jaxkd.methods.kd`: the
    participant in the ``student`` role samples the continuations and is trained; the one in the ``teacher``
    role is a gradient-stopped target (``distillm(student="peer", teacher="student")`` teaches a peer).
    """
    check_roles(name, student, teacher)
    check_choice("divergence", divergence, ("skew_kl", "skew_reverse_kl"))
    check_int("prompt_length", prompt_length, low=1)
    check_in_range("init_threshold", init_threshold, 0.0, 1.0)
    check_nonnegative("sampling_temperature", sampling_temperature)
    loss_fn = token_divergence(divergence, alpha=alpha)

    def init(rng, inputs: LossInputs) -> MethodVars:
        return MethodVars(state=distillm_schedule_init(init_threshold))

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        schedule = vars.state
        choice_rng, sample_rng = jax.random.split(rng)
        use_student = jax.random.uniform(choice_rng) < schedule.threshold

        def on_data(_):
            _, target_mask, normalizer = lm_targets(inputs.batch)
            zs, zt = inputs.output(student, method=name).logits, inputs.target(teacher, method=name).logits
            return loss_fn(zs, zt, mask=full_length_mask(target_mask), normalizer=normalizer)

        def on_student_outputs(_):
            x, target_mask = learner_rollout(inputs, sample_rng, prompt_length=prompt_length,
                                              temperature=sampling_temperature, top_k=None, top_p=None, eos_id=None,
                                              method=name, learner=student)
            s = apply_participant(inputs, student, x, train=True, method=name).logits
            t = jax.lax.stop_gradient(apply_participant(inputs, teacher, x, train=False, method=name).logits)
            return loss_fn(s, t, mask=full_length_mask(target_mask))

        value = jax.lax.cond(use_student, on_student_outputs, on_data, None)
        metrics = {"p": schedule.threshold, "student_output": use_student.astype(jnp.float32)}
        return value, LossAux(metrics, schedule)

    return Method(name=name, loss=loss, init=init, weight=weight,
                  needs=Needs(participants=(teacher,), trained=(student,), batch_keys=LM_KEYS))


def observe_validation_loss(state, validation_loss: float, *, loss_eps: float = 0.1):
    """The train state with every DistiLLM schedule of its method updated by a validation loss
    (:func:`jaxkd.methods.distillm_schedule_update`, official ``--loss-eps`` 0.1); other methods' state is
    unchanged. Host-side, after an evaluation."""
    method_state = dict(state.method_vars.state)
    for name, current in method_state.items():
        if isinstance(current, DistiLLMSchedule):
            method_state[name] = distillm_schedule_update(current, validation_loss, loss_eps=loss_eps)
    return state.replace(method_vars=state.method_vars.replace(state=method_state))
