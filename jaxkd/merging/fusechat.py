"""FuseChat's merges: VaRM (v1) and SCE (v2), weights from how far each model moved from the base.

* VaRM — Wan, Yang, Zhong, Quan, Huang, Bi, "FuseChat: Knowledge Fusion of Chat Models" (arXiv 2402.16107,
  2024; its first version was titled "Knowledge Fusion of Chat LLMs: A Preliminary Technical Report").
  Official code: github.com/fanqiwan/FuseAI (read at its mirror 18907305772/FuseAI, commit 41359744),
  ``FuseChat/merge/VaRM/{analysis,merge}.py`` with ``merge_type "square"`` and ``merge_method
  "avg_param"`` (one weight per parameter tensor), as its README runs them.
* SCE — Wan, Zhong, Yang, Chen, Quan, "FuseChat: Knowledge Fusion of Chat Models" (arXiv 2408.07990, 2024;
  EMNLP 2025), the report behind FuseChat-7B-v2.0 (merged with ``select_topk: 0.1`` in bf16,
  ``FuseChat/mergekit/fusechat_configs/fusechat-sce.yml``). Official code: ``FuseChat/mergekit/mergekit/
  merge_methods/sce_merging.py`` in the same repository (commit 6bad19c0); mergekit 0.1.5 ships it as ``sce``
  (``merge_methods/sce.py``), which jaxkd follows. (FuseChat-3.0, Yang et al. 2025, arXiv 2503.04222, fuses
  by SFT and DPO, not by merging parameters.)

Each merge takes a ``base`` parameter pytree (the pivot the targets were fine-tuned from) and ``models`` with
its structure; per leaf, τᵢ = θᵢ − θ₀ is model i's update. Merges compute in float32 (float64 for float64
inputs) and return ``base``'s dtypes; they are pure and jittable (``select_topk`` is a static Python float),
and leaves of a concrete sharded ``base`` come back with ``base``'s sharding.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxkd.checks import check_choice, check_number, is_concrete
from jaxkd.merging.consensus import agreement_mask
from jaxkd.merging.trees import check_count, check_same_structure, compute_dtype, like_base, map_leaves

PyTree = Any

# mergekit's floor on SCE's divisor (``clamp(min=1e-6)``); the official FuseChat code replaces 0 by 1 instead.
_SCE_MIN_DIVISOR = 1e-6


def _check(base: PyTree, models: Sequence[PyTree], method: str) -> None:
    check_count(models, 2, method)
    check_same_structure(base, models, method=method)


def _deltas(base_leaf: Any, model_leaves: Sequence[Any]) -> jax.Array:
    """The stacked updates ``[models, *shape]`` in the working precision."""
    dtype = compute_dtype(base_leaf)
    base = jnp.asarray(base_leaf).astype(dtype)
    return jnp.stack([jnp.asarray(m).astype(dtype) - base for m in model_leaves])


def mean_square_weights(deltas: jax.Array) -> jax.Array:
    """``wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²)`` over the stacked updates ``[models, ...]``; ``1/M`` each when all are 0.

    The equal split applies only when the total is exactly 0 (nothing moved; also an empty tensor). mergekit's
    ``sce_weight`` switches to it below a total of 1e-6 instead, which for fine-tuning updates of order 1e-3
    and smaller (mean squares of 1e-6 and below) throws the weighting away; the official FuseChat code tests
    ``== 0`` as here, and the weights are then invariant to the scale of the updates.
    """
    count = deltas.shape[0]
    if deltas.size == 0:
        return jnp.full((count,), 1.0 / count, deltas.dtype)
    power = jnp.mean(jnp.square(deltas).reshape(count, -1), axis=1)
    total = jnp.sum(power)
    moved = total > 0
    return jnp.where(moved, power / jnp.where(moved, total, 1.0), 1.0 / count)


def variation_ratio_weights(base: PyTree, models: Sequence[PyTree]) -> list[PyTree]:
    """FuseChat v1's merging weights: per leaf, ``wᵢ ∝ mean((θᵢ − θ₀)²)``, normalised over the models.

    Returns one pytree per model with ``base``'s structure holding a scalar weight per leaf (float32, or
    float64 for float64 leaves); the weights of a leaf sum to 1, and are ``1/M`` each when no model changed
    it. They can be passed as ``weights`` to the other merges (per-leaf weights).

    The official ``analysis.py`` computes the same per-tensor statistic (``sum((p2 − p1)²) / numel``);
    its ``merge.py`` gives every model weight 1 when *any* model's statistic is 0, where jaxkd only splits
    equally when *all* are (a model that left a tensor untouched then gets weight 0 for it, as the formula
    says).
    """
    _check(base, models, "variation_ratio_weights")
    per_leaf = map_leaves(_variation_ratio_weights_leaf, base, list(models))
    return [jax.tree_util.tree_map(lambda w, i=i: w[i], per_leaf) for i in range(len(models))]


def variation_ratio(base: PyTree, models: Sequence[PyTree]) -> PyTree:
    """FuseChat v1's VaRM merge: per leaf, ``θ = θ₀ + Σᵢ wᵢ (θᵢ − θ₀)`` with :func:`variation_ratio_weights`.

    The official ``merge.py`` merges the models themselves, ``Σᵢ wᵢ θᵢ``; the two are equal because the
    weights sum to 1 (``Σᵢ wᵢ θᵢ = θ₀ + Σᵢ wᵢ τᵢ``). jaxkd sums the updates, which loses less precision
    when the models are stored in bf16 (the official script also sums in bf16; jaxkd in float32).

    Two notes on the released script, for anyone reproducing FuseChat-7B-VaRM: its README runs
    ``analysis.py`` once, between the two target models rather than between the pivot and each target, and
    ``merge.py`` reads that one file for every model, so as released every model gets the same weight for
    each tensor. jaxkd implements the paper's formula (each target against the pivot ``base``).
    """
    _check(base, models, "variation_ratio")
    return map_leaves(lambda b, ms: like_base(_variation_ratio_leaf(b, ms), b), base, list(models))


# Each merge runs one compiled kernel per leaf shape: called eagerly, it then compiles once per shape instead of
# once per operation (inside a caller's jit the kernel is inlined). like_base puts results back outside it.
@jax.jit
def _variation_ratio_weights_leaf(base_leaf, model_leaves):
    return mean_square_weights(_deltas(base_leaf, model_leaves))


@jax.jit
def _variation_ratio_leaf(base_leaf, model_leaves):
    deltas = _deltas(base_leaf, model_leaves)
    weights = mean_square_weights(deltas).reshape((-1,) + (1,) * (deltas.ndim - 1))
    # A broadcast product and a sum, not tensordot: a dot may run in TF32/bf16 passes on accelerators.
    merged = jnp.asarray(base_leaf).astype(deltas.dtype) + jnp.sum(weights * deltas, axis=0)
    return merged.astype(jnp.result_type(base_leaf))


def variance_topk_mask(deltas: jax.Array, fraction: float) -> jax.Array:
    """SCE's *select* step: 1 at the ``k = int(fraction · count_nonzero(var))`` entries whose variance
    across the models (axis 0 of ``[models, ...]``, population variance) is largest, else 0.

    ``k`` is computed in float32, as mergekit and the official code compute it (``count_nonzero`` returns a
    tensor, and an integer tensor times a Python float is a float32 tensor in PyTorch); in float64 it differs
    for counts such as 90 · 0.7 (62 instead of 63). ``k`` depends on the values, so the top-k is a stable
    descending sort and a rank test (jittable); ties in variance go to the earlier entry, where ``torch.topk``
    leaves them unspecified.
    """
    variance = jnp.var(deltas, axis=0)
    flat = variance.reshape(-1)
    nonzero = jnp.count_nonzero(flat).astype(jnp.float32)
    k = jnp.floor(nonzero * jnp.float32(fraction)).astype(jnp.int32)
    order = jnp.argsort(flat, descending=True, stable=True)
    keep = jnp.zeros(flat.shape, bool).at[order].set(jnp.arange(flat.size) < k)
    return keep.reshape(variance.shape).astype(deltas.dtype)


def sce(base: PyTree, models: Sequence[PyTree], *, select_topk: float = 1.0, variant: str = "mergekit") -> PyTree:
    """FuseChat v2's SCE merge (Select, Calculate, Erase), per leaf; by default as mergekit 0.1.5's ``sce_merge``:

    1. **Select**: with ``select_topk < 1``, zero every update outside the ``select_topk`` fraction of
       entries with the largest variance across models (:func:`variance_topk_mask`).
    2. **Calculate**: ``wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²)`` on the selected updates (:func:`mean_square_weights`).
    3. **Erase**: elect each entry's sign from the sum of the updates (TIES' election,
       :func:`jaxkd.merging.consensus.agreement_mask`) and drop the updates of the other sign.
    4. Disjoint mean: ``θ = θ₀ + Σᵢ wᵢ mᵢ τᵢ / max(Σᵢ wᵢ mᵢ, 1e-6)`` with ``mᵢ`` the agreement mask.

    ``variant="fusechat"`` follows the official FuseChat code instead (``sce_merging.py``), which produced
    FuseChat-7B-v2.0: the selection only decides the weights (step 2); erase and the mean use every entry of
    the updates, and a divisor of 0 is replaced by 1 (no 1e-6 floor). With ``select_topk = 1`` the two agree.

    ``select_topk`` must lie in (0, 1] (1 keeps every entry; 0, mergekit's "keep nothing", would return the
    base unchanged and is refused as almost certainly a mistake for "trim nothing"). At least two models.

    Where jaxkd differs from both: the equal-weight fallback applies only when every selected update is exactly
    0 (as the official code; mergekit: total mean square below 1e-6, see :func:`mean_square_weights`); updates
    are computed in float32 for bf16 models (both subtract in the models' dtype).
    """
    _check(base, models, "sce")
    if not is_concrete(select_topk) or not isinstance(select_topk, (int, float)) or isinstance(select_topk, bool):
        raise ValueError(f"sce: select_topk must be a Python float in (0, 1] (a static hyper-parameter), "
                         f"got {select_topk!r}")
    check_number("sce: select_topk", select_topk, low=0.0, high=1.0, low_open=True)
    check_choice("sce: variant", variant, ("mergekit", "fusechat"))
    fraction = float(select_topk)
    return map_leaves(lambda b, ms: like_base(_sce_leaf(b, ms, fraction, variant), b), base, list(models))


@partial(jax.jit, static_argnums=(2, 3))
def _sce_leaf(base_leaf, model_leaves, fraction: float, variant: str):
    deltas = _deltas(base_leaf, model_leaves)
    selected = deltas * variance_topk_mask(deltas, fraction)[None] if fraction < 1 else deltas
    weights = mean_square_weights(selected)
    if variant == "mergekit":
        deltas = selected
    weights = weights.reshape((-1,) + (1,) * (deltas.ndim - 1)) * agreement_mask(deltas)
    divisor = jnp.sum(weights, axis=0)
    if variant == "mergekit":
        divisor = jnp.maximum(divisor, _SCE_MIN_DIVISOR)
    else:
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    merged = jnp.sum(weights * deltas, axis=0) / divisor
    return (jnp.asarray(base_leaf).astype(deltas.dtype) + merged).astype(jnp.result_type(base_leaf))


__all__ = ["mean_square_weights", "sce", "variance_topk_mask", "variation_ratio", "variation_ratio_weights"]
