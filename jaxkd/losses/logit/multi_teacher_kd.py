"""KD from several teachers: a weighted sum of per-teacher KD terms, or KD to the teachers' mixture."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_choice, check_same_logits, check_teacher_weights, check_temperature
from jaxkd.losses.core import Array, kl_from_log_probs, log_softmax, masked_logsumexp, per_example_loss

__all__ = ["multi_teacher_kd"]


@per_example_loss
def multi_teacher_kd(
    student_logits: Array,
    teacher_logits: Array,
    *,
    teacher_weights: Sequence[float] | None = None,
    temperature: float = 4.0,
    target: str = "losses",
) -> Array:
    """Knowledge distillation from ``K`` teachers, per example.

    ``teacher_logits`` is ``[..., K, C]`` (the teachers stacked on the axis before the classes), ``p = softmax(z/T)``:

    * ``target="losses"`` (default): ``L = T² Σ_k w_k · KL(p_{t_k} ‖ p_s)`` — the weighted sum of
      Hinton KD terms; with the default ``w_k = 1/K`` it is the averaged-loss multi-teacher baseline
      ("AVER") that Zhang, Chen & Wang, "Confidence-Aware Multi-Teacher Knowledge Distillation"
      (ICASSP 2022) compare against; fixed ``w_k`` weight the teachers as given (not renormalized).
    * ``target="mixture"``: ``L = T² · KL(Σ_k w_k p_{t_k} ‖ p_s)`` — KD to the averaged soft targets, as in
      You, Xu, Xu & Tao, "Learning from Multiple Teacher Networks" (KDD 2017); ``teacher_weights`` must sum to 1.

    The two differ: by convexity of KL in its first argument, the mixture loss is at most the summed one.

    Args:
      student_logits: ``[..., C]``.
      teacher_logits: ``[..., K, C]``, gradient-stopped by the caller when the teachers are not trained.
      teacher_weights: one ``w_k >= 0`` per teacher, or ``None`` for ``1/K``.
      temperature: ``T``.
      target: ``"losses"`` or ``"mixture"``.
    """
    check_temperature("temperature", temperature)
    check_choice("target", target, ("losses", "mixture"))
    if np.ndim(teacher_logits) != np.ndim(student_logits) + 1:
        raise ValueError(
            f"teacher_logits must stack the teachers as [..., K, C] next to student logits [..., C], got shapes "
            f"{np.shape(teacher_logits)} and {np.shape(student_logits)}"
        )
    check_same_logits(student_logits, teacher_logits[..., 0, :])
    w = check_teacher_weights(np.shape(teacher_logits)[-2], teacher_weights)
    log_s = log_softmax(student_logits, temperature)
    log_t = log_softmax(teacher_logits, temperature)
    if target == "losses":
        per_teacher = kl_from_log_probs(log_t, log_s[..., None, :])  # [..., K]
        return temperature**2 * jnp.sum(per_teacher * jnp.asarray(w, per_teacher.dtype), axis=-1)
    if not np.isclose(w.sum(), 1.0):
        raise ValueError(f"target='mixture' needs teacher_weights that sum to 1 (a distribution), got sum {w.sum():.6g}")
    # log Σ_k w_k p_k, with w_k = 0 teachers dropped (log 0 = -inf is the masked value).
    log_w = jnp.log(jnp.asarray(w, log_t.dtype))[:, None]
    log_mix = masked_logsumexp(jnp.where(w[:, None] > 0, log_t + log_w, -jnp.inf), axis=-2)
    return temperature**2 * kl_from_log_probs(log_mix, log_s)
