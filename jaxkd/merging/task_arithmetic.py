"""The task-arithmetic family: model soups, task arithmetic, TIES, DARE, Model Breadcrumbs and DELLA.

Every merge but :func:`linear` works on task vectors ``tau_i = theta_i - theta_0`` (a fine-tuned model minus
the base) and is one call of :func:`generalized_task_arithmetic`, as in mergekit
(``merge_methods/generalized_task_arithmetic.py``)::

    tau_i'  = sparsify(tau_i)                              (trim / drop / breadcrumbs / MAGPRUNE, rescale)
    d_i     = w_i * tau_i'
    m_i     = [sign(d_i) == sign(sum_j d_j)]               (TIES' sign election; m_i = 1 without consensus)
    theta   = theta_0 + scale * sum_i m_i d_i / D          D = sum_i m_i w_i if normalize else 1

per leaf, in float32 (float64 for float64 inputs), returned in the base's dtypes and, for concrete sharded
inputs, the base's shardings. Weights are one float per model or one pytree of per-leaf floats per model
(mergekit's per-tensor weights). ``normalize`` divides by the (agreeing) weights' sum where that is nonzero
(mergekit replaces a zero divisor by 1); with ``normalize=False`` the weights need not sum to anything. Only
:func:`linear` (a model soup, an average) requires weights summing to 1 when it does not normalize.

Hyper-parameters (density, gamma, epsilon, scale, the choices) are Python values, static under ``jax.jit``;
``weights`` may be traced. Random masks (DARE, DELLA) come from ``rng``: model ``j`` at leaf ``i`` (the
position in ``jax.tree_util.tree_leaves(base)``) draws from ``sparsify.model_key(rng, i, j)``.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_choice, check_number, is_concrete
from jaxkd.merging import sparsify as sp
from jaxkd.merging.consensus import agreement_mask
from jaxkd.merging.trees import (
    PyTree,
    _path,
    check_count,
    check_same_structure,
    compute_dtype,
    like_base,
    per_leaf_weights,
)

CONSENSUS = (None, "ties")
#: mergekit's guard: without consensus a divisor (the weights' sum) below this is replaced by 1.
DIVISOR_EPS = 1e-8


def _static_float(method: str, name: str, value: Any, **bounds) -> float:
    if isinstance(value, jax.core.Tracer):
        raise ValueError(f"{method}: {name} must be a Python float (static under jit), got a traced value")
    check_number(f"{method}: {name}", value, **bounds)
    return float(value)


def _per_model(method: str, name: str, value: Any, count: int, **bounds) -> list[float]:
    """One float for every model, or a sequence of one float per model, each checked against ``bounds``."""
    if isinstance(value, (numbers.Number, np.ndarray, jax.Array)) and np.ndim(value) == 0:
        return [_static_float(method, name, value, **bounds)] * count
    if isinstance(value, dict) or not isinstance(value, Sequence):
        raise ValueError(f"{method}: {name} must be a float or one float per model, got {type(value).__name__}")
    if len(value) != count:
        raise ValueError(f"{method}: {name} has {len(value)} entries for {count} models")
    return [_static_float(method, f"{name}[{i}]", v, **bounds) for i, v in enumerate(value)]


def _check_rescale(method: str, rescale: Any) -> None:
    if rescale not in sp.RESCALES:
        raise ValueError(f"{method}: rescale must be one of {sp.RESCALES}, got rescale={rescale!r}")


@functools.partial(jax.jit, static_argnames=("sparsification", "densities", "gammas", "epsilons", "rescale",
                                             "consensus", "normalize", "scale"))
def _merge_leaf(base_leaf, model_leaves, weights, rng, leaf_index, *, sparsification, densities, gammas, epsilons,
                rescale, consensus, normalize, scale):
    """One leaf of :func:`generalized_task_arithmetic`, compiled once per leaf shape and dtype (not op by op)."""
    dtype = compute_dtype(base_leaf)
    theta0 = base_leaf.astype(dtype)
    deltas = []
    for j, leaf in enumerate(model_leaves):
        delta = leaf.astype(dtype) - theta0
        if sparsification is not None:
            key = None if rng is None else sp.model_key(rng, leaf_index, j)
            delta = sp.sparsify_delta(delta, sparsification, density=densities[j], key=key, gamma=gammas[j],
                                      epsilon=epsilons[j], rescale=rescale)
        deltas.append(delta)
    deltas = jnp.stack(deltas)
    w = jnp.stack([jnp.asarray(v, dtype) for v in weights]).reshape((len(weights),) + (1,) * theta0.ndim)
    weighted = deltas * w
    if consensus == "ties":
        agree = agreement_mask(weighted)
        mixed = jnp.sum(weighted * agree, axis=0)
        divisor = jnp.sum(w * agree, axis=0)
        divisor = jnp.where(divisor == 0, 1, divisor)
    else:
        mixed = jnp.sum(weighted, axis=0)
        divisor = jnp.sum(w, axis=0)
        divisor = jnp.where(jnp.abs(divisor) < DIVISOR_EPS, 1, divisor)
    if normalize:
        mixed = mixed / divisor
    if scale != 1:
        mixed = mixed * scale
    return (theta0 + mixed).astype(base_leaf.dtype)


def generalized_task_arithmetic(
    base: PyTree,
    models: Sequence[PyTree],
    weights: Sequence[Any],
    *,
    sparsification: Optional[str] = None,
    density: float | Sequence[float] = 1.0,
    gamma: float | Sequence[float] = 0.01,
    epsilon: float | Sequence[float] = 0.15,
    rng: Optional[jax.Array] = None,
    rescale: Optional[str] = None,
    consensus: Optional[str] = None,
    normalize: bool = False,
    scale: float = 1.0,
    method: str = "generalized_task_arithmetic",
) -> PyTree:
    """``theta_0 + scale * sum_i m_i w_i sparsify(tau_i) / D`` leaf by leaf (the module docstring has the steps).

    mergekit's ``GeneralizedTaskArithmeticMerge`` with the same parameters: ``sparsification`` one of
    ``None`` and :data:`jaxkd.merging.sparsify.SPARSIFICATIONS`; ``density`` in ``(0, 1]``, ``gamma`` in
    ``[0, 1)`` and ``epsilon`` (``density ± epsilon`` in ``(0, 1)`` unless ``density = 1``) each one float or
    one per model; ``rescale`` one of ``None``, ``"l1"`` (mergekit's ``rescale: true``),
    ``"inverse_density"``; ``consensus`` ``None`` or ``"ties"`` (mergekit's ``"sum"``); ``scale`` is
    mergekit's ``lambda``. ``rng`` (a jax PRNG key) is needed by the random sparsifications. ``method`` names
    the caller in error messages.
    """
    check_count(models, 1, method)
    check_same_structure(base, models, method=method)
    count = len(models)
    per_model_weights = per_leaf_weights(weights, base, count, method=method)
    if sparsification is not None:
        check_choice(f"{method}: sparsification", sparsification, sp.SPARSIFICATIONS)
    check_choice(f"{method}: consensus", consensus, CONSENSUS)
    _check_rescale(method, rescale)
    densities = _per_model(method, "density", density, count, low=0.0, low_open=True, high=1.0)
    gammas = _per_model(method, "gamma", gamma, count, low=0.0, high=1.0, high_open=True)
    epsilons = _per_model(method, "epsilon", epsilon, count, low=0.0)
    if sparsification == "della_magprune":
        for d, e in zip(densities, epsilons):
            if d < 1 and not (0 < d - e and d + e < 1):
                raise ValueError(f"{method}: epsilon must keep density ± epsilon inside (0, 1), got density={d}, "
                                 f"epsilon={e}")
    scale = _static_float(method, "scale", scale)
    if sparsification in ("random", "della_magprune") and rng is None and any(d < 1 for d in densities):
        raise ValueError(f"{method}: sparsification {sparsification!r} draws random masks: pass rng, a jax PRNG "
                         f"key (e.g. jax.random.key(0))")

    # A typed key, or a raw uint32 key of any implementation (threefry's shape (2,), rbg's (4,)).
    if rng is not None and not (isinstance(rng, jax.Array) and (jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
                                                                or (rng.dtype == jnp.uint32 and rng.ndim == 1))):
        raise ValueError(f"{method}: rng must be a jax PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)), "
                         f"got {type(rng).__name__}")

    base_leaves, treedef = jax.tree_util.tree_flatten(base)
    model_leaves = [treedef.flatten_up_to(m) for m in models]
    weight_leaves = [treedef.flatten_up_to(w) for w in per_model_weights]
    random = sparsification in ("random", "della_magprune") and rng is not None
    merged = []
    for i, base_leaf in enumerate(base_leaves):
        # The leaf index is traced: one compile per leaf shape, not per leaf.
        out = _merge_leaf(base_leaf, tuple(m[i] for m in model_leaves), tuple(w[i] for w in weight_leaves),
                          rng if random else None, np.int32(i),
                          sparsification=sparsification, densities=tuple(densities), gammas=tuple(gammas),
                          epsilons=tuple(epsilons), rescale=rescale, consensus=consensus, normalize=bool(normalize),
                          scale=scale)
        merged.append(like_base(out, base_leaf))
    return jax.tree_util.tree_unflatten(treedef, merged)


@functools.partial(jax.jit, static_argnames=("normalize",))
def _soup_leaf(model_leaves, weights, *, normalize):
    """One leaf of :func:`linear`, compiled once per leaf shape and dtype."""
    dtype = compute_dtype(model_leaves[0])
    w = jnp.stack([jnp.asarray(v, dtype) for v in weights])
    out = sum(w[j] * leaf.astype(dtype) for j, leaf in enumerate(model_leaves))
    if normalize:
        out = out / jnp.sum(w)
    return out.astype(model_leaves[0].dtype)


def linear(models: Sequence[PyTree], weights: Sequence[Any], *, normalize: bool = True) -> PyTree:
    """A model soup: ``sum_i w_i theta_i / sum_i w_i`` (``normalize=True``) or ``sum_i w_i theta_i``.

    Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy without
    increasing inference time" (ICML 2022), official code github.com/mlfoundations/model-soups (the uniform
    soup is ``weights = [1] * n``). Equals mergekit's ``linear`` (same ``normalize`` default). Needs two models
    or more. With ``normalize=False`` the weights of every leaf must sum to 1 (an average: otherwise every
    parameter is scaled, which mergekit silently allows); with ``normalize=True`` a zero sum is refused (mergekit
    returns inf/NaN). Both checks need concrete weights and are skipped for traced ones. The result has
    ``models[0]``'s dtypes and, for concrete sharded inputs, its shardings.
    """
    check_count(models, 2, "linear")
    check_same_structure(models[0], models, method="linear", reference_name="models[0]")
    reference = models[0]
    per_model_weights = per_leaf_weights(weights, reference, len(models), method="linear")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(reference)
    model_leaves = [treedef.flatten_up_to(m) for m in models]
    weight_leaves = [treedef.flatten_up_to(w) for w in per_model_weights]
    merged = []
    for i, (path, first) in enumerate(leaves):
        ws = [weight_leaves[j][i] for j in range(len(models))]
        if all(is_concrete(w) for w in ws):
            total = float(np.sum([float(np.asarray(w)) for w in ws]))
            if not normalize and abs(total - 1) > 1e-6:
                raise ValueError(f"linear: with normalize=False the weights must sum to 1 (a model soup is an "
                                 f"average), got sum {total:g} at {_path(path)!r}; pass normalize=True to divide "
                                 f"by the sum")
            if normalize and total == 0:
                raise ValueError(f"linear: the weights sum to 0 at {_path(path)!r}, so normalize=True cannot "
                                 f"divide by their sum")
        out = _soup_leaf(tuple(m[i] for m in model_leaves), tuple(ws), normalize=bool(normalize))
        merged.append(like_base(out, first))
    return jax.tree_util.tree_unflatten(treedef, merged)


def task_arithmetic(base: PyTree, models: Sequence[PyTree], weights: Sequence[Any], *, normalize: bool = False,
                    scale: float = 1.0) -> PyTree:
    """Task arithmetic: ``theta_0 + scale * sum_i w_i tau_i`` (``/ sum_i w_i`` when ``normalize``).

    Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023), official code
    github.com/mlfoundations/task_vectors (the paper's ``lambda`` is ``scale``; a negative weight negates a
    task). Equals mergekit's ``task_arithmetic`` (same defaults; ``scale`` is its ``lambda``). No requirement
    on the weights' sum.
    """
    return generalized_task_arithmetic(base, models, weights, normalize=normalize, scale=scale,
                                       method="task_arithmetic")


def ties(base: PyTree, models: Sequence[PyTree], weights: Sequence[Any], *, density: float | Sequence[float],
         normalize: bool = True, scale: float = 1.0) -> PyTree:
    """TIES-Merging: trim each task vector to its top-``density`` magnitudes, elect a sign per entry, and average
    the agreeing entries: ``theta_0 + scale * sum_i m_i w_i trim(tau_i) / sum_i m_i w_i``.

    Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023), official code
    github.com/prateeksr/TIES-Merging. Equals mergekit's ``ties`` (defaults ``normalize=True``, no rescale).
    Where jaxkd (as mergekit) differs from the official code: the trim is per tensor, not over the whole
    flattened model; the sign is elected on the weighted task vectors ``w_i tau_i`` and the mean is weighted
    (with equal weights this is the paper's disjoint mean). ``density`` has no default (mergekit's 1.0 trims
    nothing); the paper uses 0.2. No requirement on the weights' sum.
    """
    return generalized_task_arithmetic(base, models, weights, sparsification="magnitude", density=density,
                                       consensus="ties", normalize=normalize, scale=scale, method="ties")


def dare(base: PyTree, models: Sequence[PyTree], weights: Sequence[Any], *, density: float | Sequence[float],
         rng: Optional[jax.Array] = None, consensus: Optional[str] = None, rescale: Optional[str] = "inverse_density",
         normalize: bool = False, scale: float = 1.0) -> PyTree:
    """DARE (drop and rescale): keep each task-vector entry with probability ``density``, rescale, then merge
    by task arithmetic (``consensus=None``, mergekit's ``dare_linear``) or with TIES' sign election
    (``consensus="ties"``, mergekit's ``dare_ties``).

    Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch"
    (ICML 2024), official code github.com/yule-BUAA/MergeLM. ``rescale="inverse_density"`` (the default) is the
    paper's ``tau * mask / density``, unbiased; mergekit's default ``rescale: true`` is ``"l1"`` (the survivors
    scaled to the task vector's L1 norm): pass ``rescale="l1"`` to reproduce mergekit. ``normalize=False`` as
    mergekit. ``rng`` (a jax PRNG key) is required; model ``j`` at leaf ``i`` draws from
    ``sparsify.model_key(rng, i, j)``. No requirement on the weights' sum.
    """
    return generalized_task_arithmetic(base, models, weights, sparsification="random", density=density, rng=rng,
                                       consensus=consensus, rescale=rescale, normalize=normalize, scale=scale,
                                       method="dare")


def breadcrumbs(base: PyTree, models: Sequence[PyTree], weights: Sequence[Any], *,
                density: float | Sequence[float], gamma: float | Sequence[float] = 0.01,
                consensus: Optional[str] = None, normalize: bool = False, scale: float = 1.0) -> PyTree:
    """Model Breadcrumbs: drop each task vector's ``gamma`` fraction of largest magnitudes (outliers) and its
    smallest, keeping ``density``; then task arithmetic (``consensus=None``, mergekit's ``breadcrumbs``) or
    TIES' sign election (``consensus="ties"``, mergekit's ``breadcrumbs_ties``).

    Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks" (ECCV 2024),
    official code github.com/rezazzr/breadcrumbs. Equals mergekit's (defaults ``gamma=0.01``,
    ``normalize=False``, no rescale). Ranked over the whole tensor, as mergekit; the official code
    (``TaskVectorMiddleKeep``) ranks each row (a torch tensor's last axis) and leaves 0-d tensors whole. When
    ``density + gamma > 1`` fewer outliers are dropped so that ``density`` is kept (mergekit's rule). ``density`` has no default (mergekit's 1.0 drops nothing, outliers
    included). No requirement on the weights' sum.
    """
    return generalized_task_arithmetic(base, models, weights, sparsification="magnitude_outliers", density=density,
                                       gamma=gamma, consensus=consensus, normalize=normalize, scale=scale,
                                       method="breadcrumbs")


def della(base: PyTree, models: Sequence[PyTree], weights: Sequence[Any], *, density: float | Sequence[float],
          epsilon: float | Sequence[float], rng: Optional[jax.Array] = None, consensus: Optional[str] = "ties",
          rescale: Optional[str] = "inverse_density", normalize: Optional[bool] = None,
          scale: float = 1.0) -> PyTree:
    """DELLA: MAGPRUNE (keep each entry with a probability in ``[density - epsilon, density + epsilon]`` rising
    with its magnitude rank in its row), rescale, elect signs (``consensus="ties"``, mergekit's ``della``) or
    not (``consensus=None``, mergekit's ``della_linear``), and fuse.

    Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling"
    (arXiv 2024), official code github.com/declare-lab/della. ``rescale="inverse_density"`` (default) divides
    each survivor by its own keep probability, as the paper and its code (``rank_magnitude``); mergekit's
    ``rescale: true`` is ``"l1"``. ``normalize=None`` picks mergekit's default for the consensus: True with
    ``"ties"`` (the paper's disjoint mean), False without. Rows are mergekit's (axis 1, a vector as one row;
    see :func:`jaxkd.merging.sparsify.della_keep_probabilities`). ``rng`` is required, as for :func:`dare`.
    ``density`` and ``epsilon`` have no defaults (mergekit's: 1.0, which prunes nothing, and 0.15).
    No requirement on the weights' sum.
    """
    if normalize is None:
        normalize = consensus is not None
    return generalized_task_arithmetic(base, models, weights, sparsification="della_magprune", density=density,
                                       epsilon=epsilon, rng=rng, consensus=consensus, rescale=rescale,
                                       normalize=normalize, scale=scale, method="della")
