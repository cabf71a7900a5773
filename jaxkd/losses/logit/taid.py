"""TAID: temporally adaptive interpolated distillation (Shing et al., ICLR 2025).

Shing, Misaki, Bao, Yokoi & Akiba, "TAID: Temporally Adaptive Interpolated Distillation for Efficient
Knowledge Transfer in Language Models", ICLR 2025. Checked against the official code
(``SakanaAI/TAID``, ``src/distil_losses/taid.py``).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxkd.checks import check_in_range, check_int, check_same_logits
from jaxkd.losses.core import Array, is_masked, log_softmax, per_example_loss, probs, to_float, zero_where_masked

__all__ = ["TAIDState", "taid", "taid_init_state", "taid_target_log_probs", "taid_update"]


def taid_target_log_probs(student_logits: Array, teacher_logits: Array, t) -> Array:
    """``log softmax((1 − t)·sg(z_s) + t·z_t)``: the interpolated target, detached from the student.

    The interpolation is in logit space, as in the official code; an entry masked (``-inf``) on
    either side is masked in the target.
    """
    zs = jax.lax.stop_gradient(to_float(student_logits))
    zt = to_float(teacher_logits)
    both = ~is_masked(zs) & ~is_masked(zt)
    mixed = (1.0 - t) * jnp.where(both, zs, 0.0) + t * jnp.where(both, zt, 0.0)
    return log_softmax(jnp.where(both, mixed, -jnp.inf))


@per_example_loss
def taid(student_logits: Array, teacher_logits: Array, *, t) -> Array:
    """TAID's loss at interpolation ``t``: ``−Σ_v p_t(v) log softmax(z_s)(v)``, ``p_t = softmax((1−t)·sg(z_s) + t·z_t)``.

    The official code computes this cross-entropy form, and so does jaxkd: TAID's adaptive update of
    ``t`` reads the loss *value*, so the value must be the one the paper's rule was tuned on. The KL
    form ``KL(p_t ‖ p_s)`` differs by the entropy ``H(p_t)``, which does not depend on the student's
    parameters (``p_t`` is detached), so both have the same gradient (tested). No temperature (as in
    the paper).

    Args:
      student_logits, teacher_logits: ``[..., V]``.
      t: interpolation in ``[0, 1]`` (0: the student's own detached distribution, 1: the teacher's).
    """
    check_same_logits(student_logits, teacher_logits)
    check_in_range("t", t, 0.0, 1.0)
    log_target = taid_target_log_probs(student_logits, teacher_logits, t)
    return -jnp.sum(probs(log_target) * zero_where_masked(log_softmax(student_logits)), axis=-1)


@flax.struct.dataclass
class TAIDState:
    """``t``, the previous loss and the momentum of its relative decrease (official initial values)."""

    t: Array
    prev_loss: Array
    momentum: Array
    initialized: Array


def taid_init_state(t_start: float) -> TAIDState:
    return TAIDState(
        t=jnp.asarray(t_start, jnp.float32),
        prev_loss=jnp.zeros((), jnp.float32),
        momentum=jnp.zeros((), jnp.float32),
        initialized=jnp.zeros((), bool),
    )


def taid_update(
    state: TAIDState,
    loss_value: Array,
    step: Array,
    *,
    total_steps: int,
    t_start: float = 0.4,
    t_end: float = 1.0,
    alpha: float = 5e-4,
    beta: float = 0.99,
) -> TAIDState:
    """TAID's adaptive update of ``t`` after a step whose (detached) loss was ``J``.

    First call: remember ``J`` and keep ``t``. Then ``δ = (J_prev − J)/(J_prev + 1e-15)``,
    ``m ← β m + (1 − β) δ``, ``t ← min(t_end, max(t_lin, t + α·sigmoid(m)·(1 − t)))`` with the linear
    floor ``t_lin = t_start + (t_end − t_start)·step/total_steps``.
    """
    check_int("total_steps", total_steps, low=1)
    j = jax.lax.stop_gradient(jnp.asarray(loss_value, jnp.float32))
    delta = (state.prev_loss - j) / (state.prev_loss + 1e-15)
    momentum = beta * state.momentum + (1.0 - beta) * delta
    t_lin = t_start + (t_end - t_start) * jnp.asarray(step, jnp.float32) / total_steps
    t_new = jnp.minimum(t_end, jnp.maximum(t_lin, state.t + alpha * jax.nn.sigmoid(momentum) * (1.0 - state.t)))
    first = ~state.initialized
    return TAIDState(
        t=jnp.where(first, state.t, t_new),
        prev_loss=j,
        momentum=jnp.where(first, state.momentum, momentum),
        initialized=jnp.ones((), bool),
    )
