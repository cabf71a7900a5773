"""The sampled-token reverse-KL estimator of self-distillation (SDFT / SDPO), in its policy-gradient form."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from jaxkd.checks import check_choice, check_positive, check_same_logits, check_temperature
from jaxkd.losses.core import Array, is_masked, log_softmax, per_example_loss
from jaxkd.losses.lm.dpo import _check_targets

__all__ = ["sampled_token_reverse_kl"]

Form = Literal["policy_gradient", "estimate"]


def _at(log_p: Array, tokens: Array) -> Array:
    vocab = log_p.shape[-1]
    valid = (tokens >= 0) & (tokens < vocab)
    picked = jnp.take_along_axis(log_p, jnp.clip(tokens, 0, vocab - 1)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, picked, jnp.nan)


@per_example_loss
def sampled_token_reverse_kl(
    student_logits: Array,
    teacher_logits: Array,
    tokens: Array,
    *,
    temperature: float = 1.0,
    form: Form = "policy_gradient",
    old_log_probs: Array | None = None,
    clip: float | None = None,
) -> Array:
    """Per-token reverse-KL estimator at the student's own sampled tokens ``x_t ~ q``, per position.

    With ``log q = log softmax(student_logits / T)[x]`` and ``log p = log softmax(teacher_logits / T)[x]`` at
    the sampled token ``x = tokens`` of each position, ``r = log q(x) − log p(x)`` is the single-sample
    (``k1``) estimate of ``KL(q ‖ p)``: ``E_{x~q}[r] = KL(q ‖ p)``. Its value's gradient ``∇log q(x)`` has
    expectation 0, so the objective is trained in its policy-gradient (REINFORCE) form, the reward being
    ``−r`` held constant::

        form="policy_gradient":  l = sg(log q(x) − log p(x)) · log q(x)        (the value TRL returns)
        form="estimate":         l = log q(x) − log p(x), with the gradient of the line above
                                 (value r, gradient sg(r)·∇log q(x): the estimate to log, the same update)

    ``E_{x~q}[sg(r)·∇log q(x)] = ∇KL(q ‖ p)`` (the score-function identity; ``E_q[∇log q] = 0``).

    Importance-sampling clipping (``old_log_probs`` and ``clip``, TRL's ``distillation_is_clip``): when the
    tokens were sampled by an older student ``q_old``, ``l`` is multiplied by the detached
    ``min(exp(clamp(log q(x) − log q_old(x), −20, 20)), clip)``.

    The estimator of Self-Distillation Fine-Tuning and Self-Distilled Policy Optimization as TRL implements
    them: ``trl/experimental/sdft/loss_utils.py`` and ``trl/experimental/sdpo/loss_utils.py``
    (``compute_sampled_token_self_distillation_loss``: ``log_ratio.detach() * student_per_token_logps``,
    only ``alpha = 1``, reverse KL; ``apply_importance_sampling_clipping``), the logits divided by the
    temperature before (``SDFTTrainer``'s ``logits / self.temperature``). The same score-function estimator
    is MiniLLM's single-sample reverse KL (Gu et al., "MiniLLM: Knowledge Distillation of Large Language
    Models", ICLR 2024) without its variance reductions.

    Conventions: at least float32; the teacher (``teacher_logits``) and ``old_log_probs`` receive zero
    gradients (detached targets); a position where the student or the teacher gives the token zero
    probability (``-inf``; the exact reverse KL would be ``+∞``) contributes 0 with zero gradients (the
    dropped-term convention of :mod:`jaxkd.losses.logit.divergences`). A token outside ``[0, V)`` raises when
    concrete (pad masked positions with a valid id) and makes its value NaN inside ``jit``.

    Args:
      student_logits, teacher_logits: ``[..., V]``, the same shape, aligned with ``tokens`` (position ``t``
        scores ``tokens[..., t]``).
      tokens: integer ``[...]``, the student's sampled tokens.
      temperature: ``T > 0`` for both.
      form: ``"policy_gradient"`` (default, TRL's value) or ``"estimate"``.
      old_log_probs: ``[...]``, the sampling policy's log-probabilities of ``tokens`` (only with ``clip``).
      clip: ``> 0``, the cap on the importance ratio; ``None`` (default) applies no importance weight.
    """
    check_temperature("temperature", temperature)
    check_choice("form", form, ("policy_gradient", "estimate"))
    check_same_logits(student_logits, teacher_logits)
    _check_targets(student_logits, tokens, None)
    if (old_log_probs is None) != (clip is None):
        raise ValueError("importance-sampling clipping needs both old_log_probs and clip (or neither)")
    if clip is not None:
        check_positive("clip", clip)
        if jnp.shape(old_log_probs) != jnp.shape(tokens):
            raise ValueError(f"old_log_probs must have the tokens' shape {jnp.shape(tokens)}, got {jnp.shape(old_log_probs)}")
    tokens = jnp.asarray(tokens)
    log_q = _at(log_softmax(student_logits, temperature), tokens)
    log_p = jax.lax.stop_gradient(_at(log_softmax(teacher_logits, temperature), tokens))
    finite = ~is_masked(log_q) & ~is_masked(log_p)
    log_q = jnp.where(finite, log_q, 0.0)
    log_p = jnp.where(finite, log_p, 0.0)
    ratio = jax.lax.stop_gradient(log_q - log_p)
    surrogate = ratio * log_q
    if form == "estimate":
        surrogate = ratio + (surrogate - jax.lax.stop_gradient(surrogate))
    if clip is not None:
        old = jnp.asarray(old_log_probs, log_q.dtype)
        weight = jnp.minimum(jnp.exp(jnp.clip(jax.lax.stop_gradient(log_q - old), -20.0, 20.0)), clip)
        surrogate = surrogate * weight
    return jnp.where(finite, surrogate, 0.0)
