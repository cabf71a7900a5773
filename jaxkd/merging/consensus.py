"""TIES' sign election, shared by TIES, DARE-TIES, breadcrumbs-TIES, DELLA and SCE.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023), official code
prateeksr/TIES-Merging; mergekit's ``get_mask(method="sum")`` computes the same thing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def elected_sign(deltas: jax.Array) -> jax.Array:
    """The sign of the total mass over models (axis 0) of the stacked deltas ``[models, ...]``; ties go to +1."""
    return jnp.where(jnp.sum(deltas, axis=0) >= 0, 1.0, -1.0).astype(deltas.dtype)


def agreement_mask(deltas: jax.Array) -> jax.Array:
    """1 where a model's delta has the elected sign, else 0 (zero deltas, already trimmed, never agree)."""
    return (jnp.sign(deltas) == elected_sign(deltas)[None]).astype(deltas.dtype)
