"""Token-level plumbing of language-model distillation: next-token alignment and global token counts.

Every token loss in :mod:`jaxkd.losses` is a per-example loss applied per token: logits ``[B, T, V]``,
a mask ``[B, T]`` (``per_example_loss`` reduces over both axes), so the divergences of
:mod:`jaxkd.losses.logit.divergences` are token losses as they are. What is specific to causal LMs is here:

* **Next-token alignment.** A causal LM's logits at position ``t`` score token ``t + 1``.
  :func:`next_token_targets` gives the targets ``tokens[:, 1:]`` and the mask of positions that have
  both a real input and a real target, ``mask[:, 1:] & mask[:, :-1]``; :func:`shift_logits` drops the
  last position, whose prediction has no target. Teacher and student logits are both shifted, so position
  ``t`` of the student is compared with position ``t`` of the teacher (both predicting token ``t + 1``).
  EasyDeL's plain distillation trainer computes its hard-label cross-entropy *unshifted*, scoring each
  token with the logits that saw it; the tests here pin the alignment.
* **Global normalization.** A token loss is a mean over the unmasked target tokens of the *whole*
  batch. Under gradient accumulation the batch is split into micro-batches whose losses are averaged;
  the mean of per-micro-batch means is not the global mean when micro-batches hold different numbers of
  tokens (trl #6006/#6452). :func:`jaxkd.batch.token_normalizer` stores, per example, the global count of
  target tokens divided by the global batch size: the sum of that entry over any ``b`` examples is
  ``b · N / B``, so dividing each micro-batch's token sum by it and averaging the ``k = B / b``
  micro-batches gives exactly ``Σ / N``. A token loss takes that count as ``normalizer=`` (the methods read
  it from the batch, :func:`jaxkd.batch.batch_normalizer`; without it a loss divides by its own token count,
  the same number for an unsplit batch). Under a sharded batch XLA sums over the global batch, so the
  count is global across devices too. The batch entries themselves are named in :mod:`jaxkd.batch`.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxkd.checks import check_same_logits
from jaxkd.losses.core import Array

__all__ = ["next_token_targets", "shift_logits"]


def _check_tokens(tokens, mask) -> None:
    if jnp.ndim(tokens) != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {jnp.shape(tokens)}")
    if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise ValueError(f"tokens must be integers, got dtype {jnp.result_type(tokens)}")
    if mask is not None and jnp.shape(mask) != jnp.shape(tokens):
        raise ValueError(f"mask must have the tokens' shape {jnp.shape(tokens)}, got {jnp.shape(mask)}")
    if jnp.shape(tokens)[1] < 2:
        raise ValueError(f"a sequence needs at least 2 tokens to have a next-token target, got length {jnp.shape(tokens)[1]}")


def check_sequence_logits(student_logits, teacher_logits, name: str, per_token) -> None:
    """Student and teacher logits of one shape ``[B, T, V]``, and ``per_token`` (an array named ``name``:
    sampled tokens, span ids) ``[B, T]``, their ``logits.shape[:2]``."""
    check_same_logits(student_logits, teacher_logits)
    if jnp.ndim(student_logits) != 3:
        raise ValueError(f"logits must be [batch, length, vocab], got shape {jnp.shape(student_logits)}")
    if jnp.shape(per_token) != jnp.shape(student_logits)[:2]:
        raise ValueError(
            f"{name} must have shape logits.shape[:2]={jnp.shape(student_logits)[:2]}, got {jnp.shape(per_token)}"
        )


def next_token_targets(tokens: Array, mask: Array | None = None) -> tuple[Array, Array]:
    """``(targets, target_mask)``, both ``[B, T − 1]``: ``targets[:, t] = tokens[:, t + 1]`` is what
    position ``t``'s logits score; ``target_mask[:, t]`` is True when both token ``t`` (the input) and
    token ``t + 1`` (the target) are real. ``mask=None`` means every token is real."""
    _check_tokens(tokens, mask)
    tokens = jnp.asarray(tokens)
    mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)
    return tokens[:, 1:], mask[:, 1:] & mask[:, :-1]


def shift_logits(logits: Array) -> Array:
    """``logits[:, :-1]``: the predictions that have a next token to score (``[B, T, V] -> [B, T−1, V]``)."""
    if jnp.ndim(logits) != 3:
        raise ValueError(f"logits must be [batch, length, vocab], got shape {jnp.shape(logits)}")
    return logits[:, :-1]
