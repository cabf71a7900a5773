"""Mean teacher's consistency cost (Tarvainen & Valpola, "Mean teachers are better role models: Weight-averaged
consistency targets improve semi-supervised deep learning results", NeurIPS 2017).

Checked against the official PyTorch code (``CuriousAI/mean-teacher``, ``pytorch/mean_teacher/losses.py``:
``softmax_mse_loss``, ``softmax_kl_loss``; ``pytorch/main.py`` divides their batch sums by the minibatch size).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxkd.checks import check_choice, check_same_logits
from jaxkd.losses.core import Array, is_masked, kl_from_log_probs, log_softmax, per_example_loss, probs

__all__ = ["mean_teacher"]

#: The consistency costs of the official code (``--consistency-type``): squared error of the softmaxes, or KL.
CONSISTENCIES = ("mse", "kl")


@per_example_loss
def mean_teacher(student_logits: Array, teacher_logits: Array, *, consistency: str = "mse") -> Array:
    """The mean teacher's consistency cost between the student's logits and the EMA model's, per example.

    With ``p = softmax(z_s)``, ``q = softmax(z_t)`` over the ``C`` classes:

    * ``consistency="mse"`` (the paper's choice and the official default): ``(1/C) Σ_c (p_c − q_c)²`` — the
      official ``softmax_mse_loss`` (``F.mse_loss(p, q, size_average=False) / num_classes``) divided by the
      minibatch size as ``main.py`` does, i.e. this per-example value averaged over the batch;
    * ``consistency="kl"``: ``KL(q ‖ p) = Σ_c q_c (log q_c − log p_c)`` — the official ``softmax_kl_loss``.

    No temperature (the official code has none). The teacher's logits are a target: pass them
    gradient-stopped in training (the official code detaches the EMA model's output). Classes excluded
    (``-inf``) on both sides are left out, and ``C`` counts the classes kept.
    """
    check_choice("consistency", consistency, CONSISTENCIES)
    check_same_logits(student_logits, teacher_logits)
    log_p, log_q = log_softmax(student_logits), log_softmax(teacher_logits)
    if consistency == "kl":
        return kl_from_log_probs(log_q, log_p)
    kept = ~(is_masked(log_p) & is_masked(log_q))
    num_classes = jnp.sum(kept, axis=-1).astype(log_p.dtype)
    diff = jnp.where(kept, probs(log_p) - probs(log_q), 0.0)
    return jnp.sum(diff * diff, axis=-1) / jnp.maximum(num_classes, 1.0)
