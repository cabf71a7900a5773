"""TAID: temporally adaptive interpolated distillation (Shing et al., ICLR 2025).

Shing, Misaki, Bao, Yokoi & Akiba, "TAID: Temporally Adaptive Interpolated Distillation for Efficient
Knowledge Transfer in Language Models", ICLR 2025. Checked against the official code
(``SakanaAI/TAID``, ``src/distil_losses/taid.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd.checks import check_in_range, check_same_logits
from jaxkd.losses.core import Array, is_masked, log_softmax, per_example_loss, probs, to_float, zero_where_masked

__all__ = ["taid", "taid_target_log_probs"]


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
