"""The batch schema: the names of a batch's entries and the host-side entries derived from them.

A batch is a mapping of arrays whose first axis is the example. Which entries a model reads is its
participant's ``input`` (:class:`jaxkd.participants.Participant`); the entries every part of jaxkd agrees on
are named here, once — :mod:`jaxkd.data` writes them, :mod:`jaxkd.methods` and :mod:`jaxkd.steps` read them,
and :mod:`jaxkd.losses` never sees a batch (its functions take arrays).

* :data:`IMAGE`, :data:`LABEL`: an image classifier's input and integer labels.
* :data:`MASK`: which examples are real in a padded batch (``[B]``), or, for language models, which tokens
  are (``[B, T]``; a row with no real token is padding).
* :data:`LABELED`: which examples carry a label in a semi-supervised batch (absent: all do).
* :data:`INDEX`: each example's row in its dataset (a per-example memory bank, e.g. CRD's).
* :data:`TOKENS`: a language model's token ids ``[B, T]``.
* :data:`SEGMENT_IDS`, :data:`POSITIONS`: for rows packing several documents, each token's document within
  its row (``1, 2, …``; 0 on padding) and its position inside that document (restarting at 0). A model reading
  them attends only within a document; the targets never cross a document boundary (:func:`target_mask`).
* :data:`LOSS_MASK`: which tokens count as targets ``[B, T]`` (True: completion or assistant tokens; False:
  prompt tokens), TRL's completion-only loss (``DataCollatorForCompletionOnlyLM``,
  ``SFTConfig(completion_only_loss=True)``'s ``completion_mask``, ``assistant_only_loss``'s
  ``assistant_masks``). Absent: every real token counts.
* :data:`MIX_PARTNER`, :data:`MIX_LAMBDA`: written inside the train step by a mixing transform (mixup,
  CutMix: :mod:`jaxkd.methods.augment`): example ``i`` is ``λ_i`` of itself and ``1 − λ_i`` of example
  ``mix_partner[i]``, so label losses score ``λ_i·ℓ(y_i) + (1 − λ_i)·ℓ(y_partner)``.
* Global counts (entries named ``*normalizer``, :data:`TOKEN_NORMALIZER`): per example, a global count over
  the global batch size, so a mean over tokens stays exact when the train step splits the batch into
  micro-batches (:func:`token_normalizer`). The step spreads such entries evenly before splitting
  (:func:`is_normalizer_key`).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "IMAGE",
    "INDEX",
    "LABEL",
    "LABELED",
    "LOSS_MASK",
    "MASK",
    "MIX_LAMBDA",
    "MIX_PARTNER",
    "POSITIONS",
    "SEGMENT_IDS",
    "TOKENS",
    "TOKEN_NORMALIZER",
    "batch_normalizer",
    "batch_target_mask",
    "is_normalizer_key",
    "normalizer_key_of",
    "target_mask",
    "token_normalizer",
    "with_token_normalizer",
]

IMAGE = "image"
LABEL = "label"
#: Valid examples of a padded batch ``[B]``; for language models, valid tokens ``[B, T]``.
MASK = "mask"
#: Which examples carry a label, for semi-supervised batches (absent: all do).
LABELED = "labeled"
#: Each example's row in its dataset.
INDEX = "index"
#: The row example ``i`` was mixed with (int32 ``[B]``; ``i`` itself when it was not mixed).
MIX_PARTNER = "mix_partner"
#: The weight of example ``i``'s own content and label in its mix (float32 ``[B]``; 1 when not mixed).
MIX_LAMBDA = "mix_lambda"
TOKENS = "tokens"
#: Each token's document within its packed row ``[B, T]`` (``1, 2, …``; 0 on padding).
SEGMENT_IDS = "segment_ids"
#: Each token's position within its document ``[B, T]`` (restarting at 0 for every packed document).
POSITIONS = "positions"
#: Which tokens count as targets ``[B, T]`` (completion-only loss: False on prompt tokens).
LOSS_MASK = "loss_mask"
#: The per-example share of the global target-token count of the tokenization under :data:`TOKENS`.
TOKEN_NORMALIZER = "token_normalizer"


def target_mask(mask: Any, segment_ids: Any = None, loss_mask: Any = None) -> Any:
    """Which next-token targets count, ``[B, T − 1]``: position ``t`` predicts token ``t + 1``, and counts when
    both are real (``mask[:, 1:] & mask[:, :-1]``: left padding, right padding and holes alike), both lie in
    the same document when ``segment_ids`` are given (the last token of a packed document predicts nothing:
    ``segment_ids[:, 1:] == segment_ids[:, :-1]``), and the target is a loss token when ``loss_mask`` is
    given (``loss_mask[:, 1:]``: prompt tokens are never targets). NumPy in, NumPy out; JAX arrays stay JAX
    arrays."""
    xp = jnp if any(isinstance(a, jax.Array) for a in (mask, segment_ids, loss_mask)) else np
    mask = xp.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"a token mask must be [batch, length], got shape {mask.shape}")
    out = mask[:, 1:] & mask[:, :-1]
    if segment_ids is not None:
        segment_ids = xp.asarray(segment_ids)
        if segment_ids.shape != mask.shape:
            raise ValueError(f"segment_ids must have the mask's shape {mask.shape}, got {segment_ids.shape}")
        out = out & (segment_ids[:, 1:] == segment_ids[:, :-1])
    if loss_mask is not None:
        loss_mask = xp.asarray(loss_mask, bool)
        if loss_mask.shape != mask.shape:
            raise ValueError(f"loss_mask must have the mask's shape {mask.shape}, got {loss_mask.shape}")
        out = out & loss_mask[:, 1:]
    return out


def _prefixed(tokens_key: str, key: str) -> str:
    """``key`` for the tokenization under ``tokens_key``: ``"segment_ids"`` for ``"tokens"``,
    ``"student_segment_ids"`` for ``"student_tokens"``."""
    if not isinstance(tokens_key, str) or not tokens_key.endswith(TOKENS):
        return key
    return tokens_key[: -len(TOKENS)] + key


def batch_target_mask(batch: Mapping[str, Any], tokens_key: str = TOKENS, mask_key: str | None = None) -> Any:
    """:func:`target_mask` of the ``tokens_key`` rows of ``batch``: its token mask (``mask_key``, default
    :data:`MASK` with ``tokens_key``'s prefix, e.g. ``"student_mask"``; absent: all real), and its
    :data:`SEGMENT_IDS` and :data:`LOSS_MASK` (same prefix) when the batch carries them."""
    mask = batch.get(_prefixed(tokens_key, MASK) if mask_key is None else mask_key)
    if mask is None:
        tokens = batch[tokens_key]
        xp = jnp if isinstance(tokens, jax.Array) else np
        mask = xp.ones(np.shape(tokens), bool)
    return target_mask(mask, batch.get(_prefixed(tokens_key, SEGMENT_IDS)),
                       batch.get(_prefixed(tokens_key, LOSS_MASK)))


def token_normalizer(target_mask) -> np.ndarray:
    """Per example, the global number of target tokens over the global batch size (float32 ``[B]``).

    Put it in the batch under :data:`TOKEN_NORMALIZER` *before* the batch is split into micro-batches or
    shards (the LM batches of :mod:`jaxkd.data.text` carry it). A batch with no target at all gives zeros,
    and the token losses are then 0 (no NaN).
    """
    target_mask = np.asarray(target_mask, bool)
    if target_mask.ndim != 2:
        raise ValueError(f"target_mask must be [batch, length], got shape {target_mask.shape}")
    batch = target_mask.shape[0]
    share = target_mask.sum() / batch if batch else 0.0
    return np.full((batch,), share, np.float32)


def normalizer_key_of(tokens_key: str) -> str:
    """The batch entry holding the global target count of the tokenization under ``tokens_key``:
    :data:`TOKEN_NORMALIZER` for ``"tokens"``, ``"<prefix>token_normalizer"`` for ``"<prefix>tokens"`` (a
    second tokenization of the same texts, e.g. ``"student_tokens"`` -> ``"student_token_normalizer"``)."""
    if not tokens_key.endswith(TOKENS):
        raise ValueError(f"tokens_key must name a tokens entry ending in 'tokens', got {tokens_key!r} (pass the "
                         "normalizer's key explicitly)")
    return tokens_key[: -len(TOKENS)] + TOKEN_NORMALIZER


def is_normalizer_key(key: str) -> bool:
    """Whether a batch entry is a per-example share of a global count (its name ends in ``normalizer``, like
    :data:`TOKEN_NORMALIZER`): the train step spreads such entries evenly over the examples before splitting
    the batch into micro-batches."""
    return isinstance(key, str) and key.endswith("normalizer")


def batch_normalizer(batch: Mapping[str, Any], key: str = TOKEN_NORMALIZER) -> jax.Array | None:
    """The global target-token count of the examples in ``batch`` (a scalar) or ``None`` when the batch does
    not carry ``key`` (default :data:`TOKEN_NORMALIZER`); pass it as a token loss's ``normalizer=``."""
    share = batch.get(key)
    return None if share is None else jnp.sum(jnp.asarray(share, jnp.float32))


def with_token_normalizer(batch: Mapping[str, Any], tokens_key: str = TOKENS,
                          mask_key: str = MASK) -> dict[str, Any]:
    """``batch`` plus the global target-token count of its ``tokens_key`` rows under
    :func:`normalizer_key_of` ``(tokens_key)`` (host side, before any split); document boundaries
    (:data:`SEGMENT_IDS`) and prompt tokens (:data:`LOSS_MASK`) are not counted (:func:`batch_target_mask`)."""
    return {**batch, normalizer_key_of(tokens_key): token_normalizer(batch_target_mask(batch, tokens_key, mask_key))}
