"""DistiLLM's adaptive off-policy schedule for student-generated outputs (adaptive SGO).

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

from jaxkd.checks import check_choice, check_in_range, check_int, check_number, check_positive
from jaxkd.losses.core import Array

__all__ = [
    "DISTILLM_DATASET",
    "DISTILLM_GENERATE",
    "DISTILLM_REPLAY",
    "DistiLLMSchedule",
    "distillm_data_source",
    "distillm_sampling_thresholds",
    "distillm_schedule_init",
    "distillm_schedule_update",
    "distillm_use_student_output",
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
