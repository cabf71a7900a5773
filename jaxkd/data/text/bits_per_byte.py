"""Bits per byte: a language model's summed next-token loss per byte of text, comparable across tokenizers.

:func:`bits_per_byte` is ``total_nats / (num_bytes · ln 2)``.  The numerator is the summed next-token
cross-entropy (in nats) over the target mask, specials included: every document has one ``EOS`` target
(and, after the first, one ``BOS`` target) whichever the tokenizer, so the two tokenizers pay for the
same events.  The denominator counts only the bytes of text that the targets stand for,
:func:`count_byte_targets`: ``Σ token_byte_lengths[target]`` over the target mask (1 for a byte token,
the token's length for a BPE token, 0 for ``PAD``/``BOS``/``EOS``).  The same text therefore gives the
same denominator under any tokenizer, up to the first token of each row (never a target), and bits per
byte compare across tokenizers where nats per token do not.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["bits_per_byte", "count_byte_targets"]


def count_byte_targets(tokens, mask, token_byte_lengths) -> int:
    """The number of text bytes the next-token targets of ``tokens`` stand for.

    ``Σ token_byte_lengths[tokens[:, 1:]]`` over the target mask ``mask[:, 1:] & mask[:, :-1]``: a byte
    token counts 1, a BPE token its length in bytes, a special 0.  This is the denominator of
    :func:`bits_per_byte` (see the module docstring).

    Args:
        tokens: integer ``[N, T]``.
        mask: bool ``[N, T]`` (True = real token).
        token_byte_lengths: integer ``[V]`` (a tokenizer's ``token_byte_lengths``).
    """
    tokens = np.asarray(tokens)
    mask = np.asarray(mask, bool)
    lengths = np.asarray(token_byte_lengths, np.int64)
    if tokens.ndim != 2 or mask.shape != tokens.shape:
        raise ValueError(
            f"tokens and mask must both be [N, T], got shapes {tokens.shape} and {mask.shape}"
        )
    if lengths.ndim != 1:
        raise ValueError(f"token_byte_lengths must be 1-D [V], got shape {lengths.shape}")
    if tokens.shape[1] < 2:
        return 0
    target_mask = mask[:, 1:] & mask[:, :-1]
    targets = tokens[:, 1:][target_mask]
    if targets.size and (targets.min() < 0 or targets.max() >= lengths.shape[0]):
        raise ValueError(
            f"target ids must lie in [0, {lengths.shape[0]}), got [{targets.min()}, {targets.max()}]"
        )
    return int(lengths[targets].sum())


def bits_per_byte(total_nats, num_bytes) -> float:
    """``total_nats / (num_bytes · ln 2)``: the summed next-token loss in bits per byte of text.

    ``total_nats`` is the cross-entropy summed (not averaged) over the target mask, specials included;
    ``num_bytes`` is :func:`count_byte_targets` of the same tokens (byte targets only), which makes the
    result comparable across tokenizers (see the module docstring).

    Raises:
        ValueError: ``num_bytes`` is not a positive number, or ``total_nats`` is negative or not finite.
    """
    total = float(np.asarray(total_nats))
    count = float(np.asarray(num_bytes))
    if not math.isfinite(total) or total < 0:
        raise ValueError(f"total_nats must be a finite number >= 0, got total_nats={total_nats!r}")
    if not math.isfinite(count) or count <= 0:
        raise ValueError(f"num_bytes must be a positive number, got num_bytes={num_bytes!r}")
    return total / (count * math.log(2.0))
