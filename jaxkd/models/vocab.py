"""Vocabulary alignment between a teacher and a student that share a tokenizer.

Released LMs often pad their embedding past the tokenizer's real size for efficient matmuls (Qwen2.5:
152064 rows for 151936 tokens). The padded rows are never a real token, but their logits make teacher
and student distributions of different lengths: TRL's GKD (trl #2215, #3028), MiniLLM (LMOps PR #331),
torchtune (#2119) crash on it, and EasyDistill slices the teacher silently to whatever the student has.
jaxkd refuses participants of different output sizes (:func:`jaxkd.create` names both sizes) unless the
difference is declared:

* :func:`truncate_vocab` wraps a model so its logits are its first ``size`` entries, the tokenizer's
  real vocabulary. It is explicit (the caller states the real size), and checked: ``size`` must not exceed
  the model's output size, and the wrapped model keeps the cut it made (``Model.vocab_size``) so the fused
  vocabulary loss cuts the output projection the same way (:func:`truncate_projection`).
* Different tokenizers are not a truncation: use a cross-tokenizer objective (``jaxkd.methods.alm``).
"""

from __future__ import annotations

import dataclasses

import jax

from jaxkd.checks import check_int
from jaxkd.models.base import Model, Outputs

__all__ = ["truncate_projection", "truncate_vocab"]


def truncate_vocab(model: Model, size: int) -> Model:
    """``model`` whose logits keep only their first ``size`` entries (``[..., :size]``).

    Raises ``ValueError`` when ``size`` is not an integer ``>= 1`` and — when the model is first traced
    (at :func:`jaxkd.create`) — when it exceeds the model's output size, naming both numbers. Features are
    unchanged; so is the model's output projection in its variables (cut it with
    :func:`truncate_projection`).
    """
    size = check_int("size", size, low=1)

    def apply(variables, x, *, train, rngs=None) -> Outputs:
        out = model.apply(variables, x, train=train, rngs=rngs)
        full = out.logits.shape[-1]
        if size > full:
            raise ValueError(
                f"truncate_vocab({model.name!r}, {size}): the model has only {full} outputs; the tokenizer's "
                f"vocabulary cannot be larger than the embedding it indexes"
            )
        return out.replace(logits=out.logits[..., :size])

    return dataclasses.replace(model, apply=apply, name=f"{model.name}[:{size}]", vocab_size=size)


def truncate_projection(projection: jax.Array, model: Model) -> jax.Array:
    """An output projection ``[d, V]`` cut to the model's declared vocabulary (``[d, vocab_size]``);
    unchanged for a model that declares none."""
    if model.vocab_size is None:
        return projection
    if model.vocab_size > projection.shape[-1]:
        raise ValueError(f"the output projection has {projection.shape[-1]} columns, fewer than the declared "
                         f"vocabulary of {model.vocab_size}")
    return projection[..., : model.vocab_size]
