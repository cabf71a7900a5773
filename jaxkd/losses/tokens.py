"""Token-level plumbing of language-model distillation: next-token alignment and global token counts.

Every token loss in :mod:`jaxkd.losses` is a per-example loss applied per token: logits ``[B, T, V]``,
a mask ``[B, T]`` (``per_example_loss`` reduces over both axes), so the divergences of
:mod:`jaxkd.losses.divergences` are token losses as they are. What is specific to causal LMs is here:

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
  tokens (trl #6006/#6452). :func:`token_normalizer` stores, per example, the global count of target
  tokens divided by the global batch size: the sum of that entry over any ``b`` examples is
  ``b · N / B``, so dividing each micro-batch's token sum by it and averaging the ``k = B / b``
  micro-batches gives exactly ``Σ / N``. :func:`batch_normalizer` reads it (``None`` when absent: the
  loss then divides by its own token count, which is the same number for an unsplit batch). Under a
  sharded batch XLA sums over the global batch, so the count is global across devices too.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jaxkd.losses.core import Array

__all__ = [
    "TOKEN_NORMALIZER_KEY",
    "batch_normalizer",
    "is_normalizer_key",
    "next_token_targets",
    "normalizer_key_of",
    "shift_logits",
    "token_normalizer",
]

#: The batch entry holding the per-example share of the global target-token count.
TOKEN_NORMALIZER_KEY = "token_normalizer"


def _check_tokens(tokens, mask) -> None:
    if jnp.ndim(tokens) != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {jnp.shape(tokens)}")
    if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise ValueError(f"tokens must be integers, got dtype {jnp.result_type(tokens)}")
    if mask is not None and jnp.shape(mask) != jnp.shape(tokens):
        raise ValueError(f"mask must have the tokens' shape {jnp.shape(tokens)}, got {jnp.shape(mask)}")
    if jnp.shape(tokens)[1] < 2:
        raise ValueError(f"a sequence needs at least 2 tokens to have a next-token target, got length {jnp.shape(tokens)[1]}")


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


def token_normalizer(target_mask) -> np.ndarray:
    """Per example, the global number of target tokens over the global batch size (float32 ``[B]``).

    Put it in the batch under :data:`TOKEN_NORMALIZER_KEY` *before* the batch is split into micro-batches
    or shards (the LM batches of :mod:`jaxkd.data.text` carry it). A batch with no target at all gives
    zeros, and the token losses are then 0 (no NaN).
    """
    target_mask = np.asarray(target_mask, bool)
    if target_mask.ndim != 2:
        raise ValueError(f"target_mask must be [batch, length], got shape {target_mask.shape}")
    batch = target_mask.shape[0]
    share = target_mask.sum() / batch if batch else 0.0
    return np.full((batch,), share, np.float32)


def normalizer_key_of(tokens_key: str) -> str:
    """The batch entry holding the global target count of the tokenization under ``tokens_key``:
    :data:`TOKEN_NORMALIZER_KEY` for ``"tokens"``, ``"<prefix>token_normalizer"`` for ``"<prefix>tokens"``
    (a second tokenization of the same texts, e.g. ``"student_tokens"`` -> ``"student_token_normalizer"``)."""
    if not tokens_key.endswith("tokens"):
        raise ValueError(f"tokens_key must name a tokens entry ending in 'tokens', got {tokens_key!r} (pass the "
                         "normalizer's key explicitly)")
    return tokens_key[: -len("tokens")] + TOKEN_NORMALIZER_KEY


def is_normalizer_key(key: str) -> bool:
    """Whether a batch entry is a per-example share of a global count (its name ends in ``normalizer``,
    like :data:`TOKEN_NORMALIZER_KEY`): the train step spreads such entries evenly over the examples before
    splitting the batch into micro-batches."""
    return isinstance(key, str) and key.endswith("normalizer")


def batch_normalizer(batch: Mapping[str, Any], key: str = TOKEN_NORMALIZER_KEY) -> Array | None:
    """The global target-token count of the examples in ``batch`` (a scalar) or ``None`` when the batch
    does not carry ``key`` (default :data:`TOKEN_NORMALIZER_KEY`); pass it as a token loss's ``normalizer=``."""
    share = batch.get(key)
    return None if share is None else jnp.sum(jnp.asarray(share, jnp.float32))
