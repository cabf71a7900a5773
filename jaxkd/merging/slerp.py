"""SLERP: spherical linear interpolation between two models, one flattened tensor at a time.

Shoemake, "Animating Rotation with Quaternion Curves" (SIGGRAPH 1985) for the formula; its use for merging
language models comes from mergekit (Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language
Models", 2024; github.com/arcee-ai/mergekit, ``merge_methods/slerp.py``), and FuseChat compares against it.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxkd.checks import check_number
from jaxkd.merging.trees import check_same_structure, compute_dtype, like_base, map_leaves, per_leaf_weights

PyTree = Any


def slerp(a: PyTree, b: PyTree, t: Any, *, dot_threshold: float = 0.9995, eps: float = 1e-8) -> PyTree:
    """Interpolate every leaf of ``a`` towards ``b`` along the great circle through them.

    Each leaf is treated as one flattened vector (mergekit 0.1.5 does the same for one tensor: its kernel
    keeps only the leading axis of a *batch of tensors* apart, and a single tensor is a batch of one):

        â = a / ‖a‖,  b̂ = b / ‖b‖,  cos θ = clip(â · b̂, −1, 1)
        slerp(a, b; t) = sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b

    The unnormalised ``a`` and ``b`` are combined (as mergekit does), so norms are interpolated too. When
    ``|cos θ| > dot_threshold`` the vectors are nearly collinear (or antipodal) and ``sin θ`` is too small to
    divide by, so the leaf is merged linearly, ``(1−t)·a + t·b``. A norm at most ``eps`` counts as 1, as in
    mergekit: a zero tensor has cosine 0 with anything and gets the θ = π/2 coefficients.

    ``t`` is a float or a pytree with ``a``'s structure holding one float per leaf (mergekit's per-layer
    ``t`` gradients). ``t = 0`` returns ``a`` and ``t = 1`` returns ``b``. Values outside ``[0, 1]``
    extrapolate along the same arc, as mergekit allows (no check there either); only non-finite ``t`` is
    refused. Leaves are computed in float32 (float64 for float64 ``a``) and returned in ``a``'s dtype;
    gradients with respect to ``t``, ``a`` and ``b`` stay finite on both branches (the unused branch of each
    ``where`` is kept away from ``arccos(±1)`` and ``0/0``). Pure and jittable (``dot_threshold`` and ``eps``
    are static Python floats); leaves of a concrete sharded ``a`` come back with ``a``'s sharding.
    """
    _check_two_models(a, b)
    check_same_structure(a, [b], method="slerp", reference_name="a", names=["b"])
    check_number("slerp: dot_threshold", dot_threshold, low=0.0, high=1.0)
    check_number("slerp: eps", eps, low=0.0, low_open=True)
    (t_tree,) = per_leaf_weights([t], a, 1, method="slerp", name="t")
    for leaf in jax.tree_util.tree_leaves(t_tree):
        check_number("slerp: t", leaf)  # finite; extrapolation outside [0, 1] is allowed (see above)
    return map_leaves(lambda x, y, s: like_base(_slerp_leaf(x, y, s, float(dot_threshold), float(eps)), x),
                      a, b, t_tree)


def _check_two_models(a: PyTree, b: PyTree) -> None:
    """Refuse ``slerp(base, [m1, m2, ...], t)``-style calls: SLERP is defined for exactly two models."""
    for name, candidate, other in (("b", b, a), ("a", a, b)):
        if isinstance(candidate, (list, tuple)) and candidate and _is_models(candidate, other):
            raise ValueError(f"slerp interpolates exactly two models, a and b; `{name}` is a sequence of "
                             f"{len(candidate)} models with the other's structure. Merge more models with "
                             f"another method (e.g. a linear or task-arithmetic merge)")


def _is_models(sequence: Sequence[PyTree], reference: PyTree) -> bool:
    treedef = jax.tree_util.tree_structure(reference)
    return all(jax.tree_util.tree_structure(m) == treedef for m in sequence)


def _safe_norm(x: jax.Array, eps: float) -> jax.Array:
    """``‖x‖``, or 1 when ``‖x‖ <= eps``, with a finite gradient at 0 (``jnp.linalg.norm``'s is NaN there)."""
    squared = jnp.sum(jnp.square(x))
    big = squared > eps * eps
    return jnp.where(big, jnp.sqrt(jnp.where(big, squared, 1.0)), 1.0)


# One compiled kernel per leaf shape: called eagerly, a merge then compiles once per shape instead of once per
# operation (and inside a caller's jit it is inlined). The put-back onto a's sharding happens outside it.
@partial(jax.jit, static_argnums=(3, 4))
def _slerp_leaf(x: Any, y: Any, t: Any, dot_threshold: float, eps: float) -> jax.Array:
    dtype = compute_dtype(x)
    u = jnp.asarray(x).astype(dtype)
    v = jnp.asarray(y).astype(dtype)
    t = jnp.asarray(t).astype(dtype)
    if u.size == 0:
        return ((1 - t) * u + t * v).astype(x.dtype)
    # Normalise before multiplying so the dot product cannot overflow (as mergekit does).
    dot = jnp.clip(jnp.sum((u / _safe_norm(u, eps)) * (v / _safe_norm(v, eps))), -1.0, 1.0)
    linear = jnp.abs(dot) > dot_threshold
    theta = jnp.arccos(jnp.where(linear, 0.0, dot))  # arccos(0) = π/2 on the linear branch: no 0/0 there
    sin_theta = jnp.sin(theta)
    coef_a = jnp.where(linear, 1 - t, jnp.sin((1 - t) * theta) / sin_theta)
    coef_b = jnp.where(linear, t, jnp.sin(t * theta) / sin_theta)
    return (coef_a * u + coef_b * v).astype(x.dtype)


__all__ = ["slerp"]
