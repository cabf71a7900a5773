"""What the ranking methods share (:mod:`~jaxkd.methods.logit.margin_mse`, :mod:`~jaxkd.methods.logit.listwise_kd`):
reading candidate scores and putting the labeled candidate first.

The participants' ``logits`` are the scores ``[B, num_candidates]`` of each query's candidate list (a
re-ranker scoring ``N`` documents per query); an optional batch entry marks the real candidates of
ragged lists.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd.methods.base import require

__all__ = []


def candidate_scores(inputs, student: str, teacher: str, candidate_mask: str | None, name: str):
    """The learner's scores, the target's (gradient-stopped) and the real-candidate mask (or ``None``)."""
    s = inputs.output(student, method=name).logits
    t = inputs.target(teacher, method=name).logits
    mask = None if candidate_mask is None else require(inputs.batch, candidate_mask, method=name)
    return s, t, mask


def label_first(scores: jax.Array, labels: jax.Array) -> jax.Array:
    """``scores`` with column 0 and the label's column swapped: the labeled class becomes the positive."""
    columns = jnp.arange(scores.shape[-1])
    y = labels[:, None]
    order = jnp.where(columns == 0, y, jnp.where(columns == y, 0, columns))
    return jnp.take_along_axis(scores, order, axis=-1)
