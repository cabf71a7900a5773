"""Divergences between the categorical distributions two sets of logits define."""

from __future__ import annotations

import jax.numpy as jnp

from jaxkd.losses._core import (
    Array,
    Reduction,
    check_positive,
    check_same_logits,
    finite_or_zero,
    log_softmax,
    reduce_loss,
)


def kl_per_example(target_logits: Array, logits: Array, *, temperature: float = 1.0) -> Array:
    """``KL(p ‖ q) = Σ_c p_c (log p_c − log q_c)`` per example, ``p = softmax(target/T)``, ``q = softmax(logits/T)``.

    Entries with ``p_c = 0`` (a ``-inf`` target logit) contribute 0 (convention ``0·log 0 = 0``); entries
    where ``q`` is masked (``-inf``) are dropped from the sum rather than making the loss infinite — the
    convention DistiLLM uses for masked vocabulary. Returns float32 ``[...]``.
    """
    check_positive("temperature", temperature)
    check_same_logits(logits, target_logits)
    log_p = log_softmax(target_logits, temperature)
    log_q = log_softmax(logits, temperature)
    p = jnp.exp(log_p)
    return jnp.sum(p * (finite_or_zero(log_p) - finite_or_zero(log_q)), axis=-1)


def kl_divergence(
    target_logits: Array,
    logits: Array,
    *,
    temperature: float = 1.0,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Forward KL ``KL(softmax(target/T) ‖ softmax(logits/T))`` reduced over examples.

    The gradient flows into both arguments; wrap the target in ``jax.lax.stop_gradient`` to detach it.
    See :func:`kl_per_example` for the masking conventions and :func:`jaxkd.losses.reduce_loss` for the
    reduction (mean over unmasked examples by default).
    """
    per_example = kl_per_example(target_logits, logits, temperature=temperature)
    return reduce_loss(per_example, mask=mask, weights=weights, reduction=reduction)

