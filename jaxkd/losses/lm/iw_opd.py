"""Importance-Weighted On-Policy Distillation (IW-OPD): the sampled-token policy gradient reweighted by position."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd.checks import check_nonnegative, check_positive, check_temperature
from jaxkd.losses.core import Array, Reduction, is_masked, log_softmax, reduce_loss
from jaxkd.losses.lm.dpo import _check_targets
from jaxkd.losses.lm.tokens import check_sequence_logits
from jaxkd.losses.lm.sampled_token_reverse_kl import _at

__all__ = ["iw_opd", "iw_opd_weights"]


def iw_opd_weights(advantages: Array, mask: Array | None = None, *, gamma: float = 0.5, epsilon: float = 1e-8) -> Array:
    """IW-OPD's position weights ``w_t = 1 + γ·(1 − Σ_{s<t} |a_s| / max(Σ_s |a_s|, ε))``, ``[B, T] → [B, T]``.

    The prefix sum is over the unmasked positions before ``t`` of the same sequence (exclusive), the total
    over all of its unmasked positions: a token after a prefix on which teacher and student already
    disagreed much gets a weight near 1, an early token (or one after agreement) up to ``1 + γ``. Detached
    (constants). TRL ``IWOPDTrainer._compute_iw_opd_loss`` (``abs.cumsum(dim=1) − abs``,
    ``sum.clamp_min(iw_opd_epsilon)``).
    """
    check_nonnegative("gamma", gamma)
    check_positive("epsilon", epsilon)
    if jnp.ndim(advantages) != 2:
        raise ValueError(f"advantages must be [batch, length], got shape {jnp.shape(advantages)}")
    a = jnp.asarray(advantages)
    if mask is not None:
        if jnp.shape(mask) != jnp.shape(a):
            raise ValueError(f"mask must have the advantages' shape {jnp.shape(a)}, got {jnp.shape(mask)}")
        a = jnp.where(jnp.asarray(mask, bool), a, 0.0)
    magnitude = jnp.abs(jax.lax.stop_gradient(a))
    prefix = jnp.cumsum(magnitude, axis=1) - magnitude
    total = jnp.maximum(jnp.sum(magnitude, axis=1, keepdims=True), epsilon)
    return jax.lax.stop_gradient(1.0 + gamma * (1.0 - prefix / total))


def iw_opd(
    student_logits: Array,
    teacher_logits: Array,
    tokens: Array,
    mask: Array | None = None,
    *,
    temperature: float = 1.0,
    gamma: float = 0.5,
    epsilon: float = 1e-8,
    rollout_log_probs: Array | None = None,
    reduction: Reduction = "mean",
    normalizer: Array | float | None = None,
) -> Array:
    """Importance-Weighted On-Policy Distillation on the student's sampled tokens: ``[B, T, V]`` → scalar.

    With ``log q(x_t)`` / ``log p(x_t)`` the student's / teacher's log-probabilities (``softmax(z / T)``) of
    the sampled token ``x_t = tokens[:, t]`` and ``log μ(x_t)`` those of the policy that sampled it
    (``rollout_log_probs``; the student's own, detached, when not given)::

        a_t = sg(log p(x_t) − log μ(x_t))                         (0 at masked positions)
        w_t = 1 + γ·(1 − Σ_{s<t} |a_s| / max(Σ_s |a_s|, ε))       (:func:`iw_opd_weights`, detached)
        l_t = −log q(x_t) · w_t · a_t

    reduced over the unmasked positions (:func:`jaxkd.losses.reduce_loss`: ``"mean"`` is TRL's
    ``loss.sum() / valid.sum()``, ``normalizer`` its ``num_items_in_batch``). With ``γ = 0`` and no
    ``rollout_log_probs`` each ``l_t`` is ``sg(log q − log p)·log q``, the value of :func:`jaxkd.losses.sampled_token_reverse_kl` (SDFT's
    sampled-token reverse KL); ``γ > 0`` weights the early tokens and those after an agreeing prefix more.

    Xie, Zhu, Wen, Chen & Wang, "On the Position Bias of On-Policy Distillation" (2026, arXiv:2606.22600),
    as TRL implements it: ``trl/experimental/iw_opd/iw_opd_trainer.py``, ``IWOPDTrainer._compute_iw_opd_loss``
    (defaults ``iw_opd_gamma = 0.5``, ``iw_opd_epsilon = 1e-8``; the teacher's log-probabilities from
    ``log_softmax(teacher_logits / T)`` at the completion tokens).

    Conventions: at least float32; only ``student_logits`` is differentiated. TRL raises when a teacher
    log-probability is missing (non-finite) at a valid position; here a position whose sampled token has
    zero probability (``-inf``) under the teacher, the student or ``rollout_log_probs`` is left out like a
    masked one (its ``a_t = 0``, loss 0, zero gradients; it still counts in the mean). Masked positions may hold any token id in
    ``[0, V)``.

    Args:
      student_logits, teacher_logits: ``[B, T, V]``, aligned with ``tokens``.
      tokens: integer ``[B, T]``, the sampled tokens.
      mask: boolean ``[B, T]``, the completion tokens (TRL's ``labels != -100``); all when ``None``.
      temperature: ``T > 0``; gamma: ``γ >= 0``; epsilon: ``ε > 0``.
      rollout_log_probs: ``[B, T]``, the sampling policy's log-probabilities of ``tokens`` (e.g. vLLM's).
      reduction, normalizer: as in :func:`jaxkd.losses.reduce_loss` (``"none"`` gives ``[B, T]``).
    """
    check_temperature("temperature", temperature)
    check_nonnegative("gamma", gamma)
    check_positive("epsilon", epsilon)
    check_sequence_logits(student_logits, teacher_logits, "tokens", tokens)
    _check_targets(student_logits, tokens, None)
    if mask is not None and jnp.shape(mask) != jnp.shape(tokens):
        raise ValueError(f"mask must have the tokens' shape {jnp.shape(tokens)}, got {jnp.shape(mask)}")
    if rollout_log_probs is not None and jnp.shape(rollout_log_probs) != jnp.shape(tokens):
        raise ValueError(
            f"rollout_log_probs must have the tokens' shape {jnp.shape(tokens)}, got {jnp.shape(rollout_log_probs)}"
        )
    tokens = jnp.asarray(tokens)
    log_q = _at(log_softmax(student_logits, temperature), tokens)
    log_p = jax.lax.stop_gradient(_at(log_softmax(teacher_logits, temperature), tokens))
    log_mu = jax.lax.stop_gradient(log_q if rollout_log_probs is None else jnp.asarray(rollout_log_probs, log_q.dtype))
    valid = ~is_masked(log_q) & ~is_masked(log_p) & ~is_masked(log_mu)
    if mask is not None:
        valid = valid & jnp.asarray(mask, bool)
    log_q = jnp.where(valid, log_q, 0.0)
    advantages = jnp.where(valid, log_p - jnp.where(valid, log_mu, 0.0), 0.0)
    weights = iw_opd_weights(advantages, gamma=gamma, epsilon=epsilon)
    per_token = -log_q * jax.lax.stop_gradient(weights * advantages)
    # The user's mask reduces; the -inf positions are 0 in the value but still count in the mean's denominator.
    return reduce_loss(jnp.where(valid, per_token, 0.0), mask=mask, reduction=reduction, normalizer=normalizer)
