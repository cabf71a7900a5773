"""Sparsifying one task vector (a fine-tuned tensor minus the base tensor): which entries to keep, and how to
rescale what is kept.

Four ways to choose the kept entries, each a function returning a 0/1 mask with the delta's shape:

* :func:`magnitude_mask` (TIES' trim): the ``k = max(1, int(density * n))`` entries of largest ``|delta|``.
  Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023), official code
  github.com/prateeksr/TIES-Merging. The official code trims the whole model's flattened task vector at once
  (``kthvalue``, keeping every entry tied with the k-th); jaxkd trims each tensor on its own, as mergekit's
  ``sparsify.magnitude`` does, and keeps exactly ``k`` entries.
* :func:`random_mask` (DARE's drop): each entry kept independently with probability ``density``. Yu et al.,
  "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch" (ICML 2024,
  arXiv 2023), official code github.com/yule-BUAA/MergeLM.
* :func:`outlier_mask` (Model Breadcrumbs): drop the ``int(gamma * n)`` largest entries and the smallest, keep
  ``int(density * n)`` (mergekit's ``magnitude_outliers``: when ``density + gamma > 1`` fewer outliers are
  dropped, so that ``density`` is kept). Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model
  Merging with Sparse Masks" (ECCV 2024, arXiv 2023).
* :func:`della_keep_probabilities` / :func:`della_mask` (DELLA's MAGPRUNE): within each row, entries ranked by
  ``|delta|`` get keep probabilities spread linearly over ``[density - epsilon, density + epsilon]``, the
  largest the most likely kept. Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through
  Magnitude-Based Sampling" (arXiv 2024), official code github.com/declare-lab/della (``rank_magnitude``).

Rescaling what is kept (:func:`rescale_kept`): ``"inverse_density"`` divides each kept entry by its keep
probability (``density`` for DARE, the per-entry probability for DELLA: both papers' rescale, which keeps the
delta's expectation); ``"l1"`` multiplies by ``||delta||_1 / ||kept||_1`` (mergekit's ``rescale: true``, which
keeps the L1 norm of this draw); ``None`` keeps the survivors as they are.

Random masks come from a jax PRNG key. A merge draws the mask of model ``j`` at leaf ``i`` (the position in
``jax.tree_util.tree_leaves(base)``) from :func:`model_key` ``(rng, i, j)`` so that a caller (or a test
feeding the very same masks to mergekit) can redraw any of them.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

SPARSIFICATIONS = ("magnitude", "random", "magnitude_outliers", "della_magprune")
RESCALES = (None, "l1", "inverse_density")

#: mergekit's ``rescaled_masked_tensor`` leaves the survivors unscaled when either L1 norm is below this.
L1_EPS = 1e-7


def model_key(rng: jax.Array, leaf_index: int, model_index: int) -> jax.Array:
    """The key of model ``model_index``'s mask at leaf ``leaf_index``: ``fold_in(fold_in(rng, leaf), model)``."""
    return jax.random.fold_in(jax.random.fold_in(rng, leaf_index), model_index)


def magnitude_mask(delta: jax.Array, density: float) -> jax.Array:
    """1 on the ``max(1, int(density * n))`` entries of largest ``|delta|``; all ones when ``density >= 1``."""
    n = delta.size
    if density >= 1 or n == 0:
        return jnp.ones_like(delta)
    k = max(1, int(density * n))
    _, kept = jax.lax.top_k(jnp.abs(delta).reshape(-1), k)
    return jnp.zeros(n, delta.dtype).at[kept].set(1).reshape(delta.shape)


def outlier_mask(delta: jax.Array, density: float, gamma: float) -> jax.Array:
    """Model Breadcrumbs' mask: drop the top ``int(gamma * n)`` of ``|delta|`` and the smallest, keep
    ``int(density * n)`` (mergekit's rounding: no ``max(1, ...)``, so a tiny density can keep nothing)."""
    n = delta.size
    if density >= 1 or n == 0:
        return jnp.ones_like(delta)
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)  # when density + gamma > 1, fewer outliers go (mergekit)
    ascending = jnp.argsort(jnp.abs(delta).reshape(-1))
    return jnp.zeros(n, delta.dtype).at[ascending[n_bottom:n_bottom + target]].set(1).reshape(delta.shape)


def random_mask(key: jax.Array, shape: tuple, density: float, dtype=jnp.float32) -> jax.Array:
    """DARE's mask: each entry kept (1) independently with probability ``density``; all ones when ``density >= 1``."""
    if density >= 1:
        return jnp.ones(shape, dtype)
    return jax.random.bernoulli(key, density, shape).astype(dtype)


def _rows(delta: jax.Array) -> jax.Array:
    # mergekit ranks along dim 1 of the tensor (a torch Linear weight's input axis), a vector as one row.
    return delta.reshape(1, -1) if delta.ndim < 2 else delta


def della_keep_probabilities(delta: jax.Array, density: float, epsilon: float) -> jax.Array:
    """MAGPRUNE's keep probability of each entry: ``density - epsilon + 2 epsilon (r - 1) / (L - 1)`` where ``r``
    is the entry's 1-based rank by ``|delta|`` along axis 1 (the whole vector for a 1-D or 0-D delta) and ``L``
    that axis' length.

    Axis 1 is mergekit's and DELLA's row of a torch ``[out, in]`` weight; a Flax ``[in, out]`` kernel (as
    ``jaxkd.models.from_hf`` makes them) is ranked along its output axis instead. A row of one entry
    (``L = 1``, where mergekit divides 0 by 0) gets probability ``density``. All ones when ``density >= 1``.
    """
    if density >= 1:
        return jnp.ones_like(delta)
    rows = _rows(delta)
    length = rows.shape[1]
    # 0-based rank of each entry within its row: argsort of the ascending argsort.
    rank = jnp.argsort(jnp.argsort(jnp.abs(rows), axis=1), axis=1).astype(delta.dtype)
    position = rank / (length - 1) if length > 1 else jnp.full_like(rows, 0.5)
    return ((density - epsilon) + position * (2 * epsilon)).reshape(delta.shape)


def della_mask(key: jax.Array, delta: jax.Array, density: float, epsilon: float) -> jax.Array:
    """MAGPRUNE's mask: entry kept (1) with its :func:`della_keep_probabilities` probability."""
    if density >= 1:
        return jnp.ones_like(delta)
    return jax.random.bernoulli(key, della_keep_probabilities(delta, density, epsilon)).astype(delta.dtype)


def rescale_kept(delta: jax.Array, mask: jax.Array, rescale: Optional[str],
                 keep_probability=None) -> jax.Array:
    """``delta * mask``, rescaled: ``"inverse_density"`` divides by ``keep_probability`` (a float or an array
    like ``delta``), ``"l1"`` matches ``delta``'s L1 norm (unscaled when either norm is below ``L1_EPS``, as
    mergekit), ``None`` does nothing."""
    kept = delta * mask
    if rescale is None:
        return kept
    if rescale == "inverse_density":
        return kept / keep_probability
    if rescale == "l1":
        before = jnp.sum(jnp.abs(delta))
        after = jnp.sum(jnp.abs(kept))
        degenerate = (before < L1_EPS) | (after < L1_EPS)
        return jnp.where(degenerate, kept, kept * (before / jnp.where(degenerate, 1, after)))
    raise ValueError(f"rescale must be one of {RESCALES}, got rescale={rescale!r}")


def sparsify_delta(delta: jax.Array, method: str, *, density: float, key: Optional[jax.Array] = None,
                   gamma: float = 0.01, epsilon: float = 0.15, rescale: Optional[str] = None) -> jax.Array:
    """One task vector sparsified by ``method`` (one of :data:`SPARSIFICATIONS`, mergekit's names) and rescaled.

    ``key`` is needed by ``"random"`` and ``"della_magprune"``. ``"inverse_density"`` divides by ``density``
    for the deterministic masks, by the per-entry keep probability for DELLA. ``density >= 1`` returns
    ``delta`` unchanged, as mergekit.
    """
    if method not in SPARSIFICATIONS:
        raise ValueError(f"method must be one of {SPARSIFICATIONS}, got method={method!r}")
    if density >= 1:
        return delta
    if method in ("random", "della_magprune") and key is None:
        raise ValueError(f"sparsification {method!r} draws a random mask: pass a jax PRNG key")
    keep_probability = density
    if method == "magnitude":
        mask = magnitude_mask(delta, density)
    elif method == "magnitude_outliers":
        mask = outlier_mask(delta, density, gamma)
    elif method == "random":
        mask = random_mask(key, delta.shape, density, delta.dtype)
    else:
        keep_probability = della_keep_probabilities(delta, density, epsilon)
        mask = jax.random.bernoulli(key, keep_probability).astype(delta.dtype)
    return rescale_kept(delta, mask, rescale, keep_probability)
