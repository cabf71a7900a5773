"""The pytree plumbing every merge shares: checking that models line up, task vectors, per-leaf weights,
the working precision and the output's sharding.

A merge takes a ``base`` parameter pytree and a sequence of ``models`` with ``base``'s structure (same paths,
same shapes). Weights are a sequence of floats, one per model, or of pytrees with ``base``'s structure holding
one float per leaf (per-layer weights, as mergekit's per-tensor ``weight`` gradients do). Every merge computes in
float32 (float64 when the inputs are float64), as mergekit does, and returns leaves in ``base``'s dtype.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def _path(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/") or "<root>"


def check_count(models: Sequence[PyTree], minimum: int, method: str) -> None:
    """Raise a ValueError when fewer than ``minimum`` models are given."""
    if isinstance(models, dict) or not isinstance(models, Sequence):
        raise ValueError(f"{method}: `models` must be a sequence (list or tuple) of parameter pytrees, "
                         f"got {type(models).__name__}")
    if len(models) < minimum:
        raise ValueError(f"{method} needs at least {minimum} model{'s' if minimum > 1 else ''}, got {len(models)}")


def check_same_structure(reference: PyTree, models: Sequence[PyTree], *, method: str,
                         reference_name: str = "base", names: Sequence[str] | None = None) -> None:
    """Raise a ValueError naming the first path where a model's tree or a leaf's shape differs from the reference.

    The message names the path and, for a shape mismatch, both shapes, so a user merging two checkpoints of
    different widths learns which layer disagrees. ``names`` (default ``models[i]``) are the models' names
    in the message, e.g. ``["b"]`` for a two-argument merge.
    """
    ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(reference)
    for index, model in enumerate(models):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(model)
        name = f"models[{index}]" if names is None else names[index]
        if treedef != ref_def:
            ref_paths = [_path(p) for p, _ in ref_leaves]
            paths = [_path(p) for p, _ in leaves]
            for a, b in zip(ref_paths, paths):
                if a != b:
                    raise ValueError(f"{method}: {name}'s tree differs from {reference_name}'s at the first differing "
                                     f"path: {reference_name} has {a!r}, {name} has {b!r}")
            longer, shorter, extra = ((reference_name, name, ref_paths[len(paths)]) if len(ref_paths) > len(paths)
                                      else (name, reference_name, paths[len(ref_paths)]))
            raise ValueError(f"{method}: {name}'s tree differs from {reference_name}'s: {longer} has {extra!r}, "
                             f"which {shorter} lacks")
        for (path, ref), (_, leaf) in zip(ref_leaves, leaves):
            if np.shape(ref) != np.shape(leaf):
                raise ValueError(f"{method}: {name} differs from {reference_name} at {_path(path)!r}: shape "
                                 f"{tuple(np.shape(leaf))} vs {reference_name}'s {tuple(np.shape(ref))}")


def per_leaf_weights(weights: Any, base: PyTree, count: int, *, method: str, name: str = "weights") -> list[PyTree]:
    """Return ``count`` pytrees with ``base``'s structure whose leaves are the scalar weight of that model and leaf.

    ``weights`` is a sequence of ``count`` entries, each a float (one weight for every leaf of that model) or a
    pytree with ``base``'s structure holding one float per leaf.
    """
    if isinstance(weights, (numbers.Number, np.ndarray, jax.Array)) and np.ndim(weights) == 0:
        raise ValueError(f"{method}: `{name}` must be a sequence with one entry per model ({count}), got one number")
    if isinstance(weights, dict) or not isinstance(weights, (Sequence, np.ndarray, jax.Array)):
        raise ValueError(f"{method}: `{name}` must be a sequence with one entry per model, "
                         f"got {type(weights).__name__}")
    if len(weights) != count:
        raise ValueError(f"{method}: `{name}` has {len(weights)} entries for {count} models")
    treedef = jax.tree_util.tree_structure(base)
    out = []
    for index, w in enumerate(weights):
        if np.ndim(w) == 0 and not isinstance(w, (dict, list, tuple)):
            out.append(jax.tree_util.tree_unflatten(treedef, [w] * treedef.num_leaves))
            continue
        if jax.tree_util.tree_structure(w) != treedef:
            check_same_structure(base, [w], method=f"{method} ({name}[{index}])")
            raise ValueError(f"{method}: {name}[{index}] must be a float or a pytree with base's structure")
        for path, leaf in jax.tree_util.tree_flatten_with_path(w)[0]:
            if np.ndim(leaf) != 0:
                raise ValueError(f"{method}: {name}[{index}] at {_path(path)!r} must be one float per leaf, "
                                 f"got shape {tuple(np.shape(leaf))}")
        out.append(w)
    return out


def compute_dtype(x: Any) -> jnp.dtype:
    """float64 inputs stay float64; everything else is merged in float32 (bf16 sums lose the small updates)."""
    return jnp.float64 if jnp.result_type(x) == jnp.float64 else jnp.float32


def like_base(merged: jax.Array, base_leaf: Any) -> jax.Array:
    """Cast to the base leaf's dtype and, for a concrete sharded base, lay the result out like it.

    Elementwise merges keep their inputs' layout by themselves; merges that rank a whole tensor (top-k,
    variance selection, norms) may gather it, so the result is put back where the base leaf lives.
    Inside a caller's ``jit`` the leaves are tracers and the caller's ``out_shardings`` decide.
    """
    merged = merged.astype(jnp.result_type(base_leaf))
    sharding = getattr(base_leaf, "sharding", None)
    if isinstance(base_leaf, jax.Array) and not isinstance(base_leaf, jax.core.Tracer) and sharding is not None:
        if getattr(merged, "sharding", None) != sharding:
            merged = jax.device_put(merged, sharding)
    return merged


def map_leaves(fn: Callable[..., jax.Array], base: PyTree, *trees: PyTree) -> PyTree:
    """``jax.tree.map`` over ``base`` and ``trees`` (lists of pytrees are passed as lists of leaves)."""
    flat_base, treedef = jax.tree_util.tree_flatten(base)
    columns = []
    for tree in trees:
        if isinstance(tree, list):
            columns.append([treedef.flatten_up_to(t) for t in tree])
        else:
            columns.append(treedef.flatten_up_to(tree))
    out = []
    for i, leaf in enumerate(flat_base):
        args = [[c[i] for c in col] if isinstance(trees[k], list) else col[i] for k, col in enumerate(columns)]
        out.append(fn(leaf, *args))
    return jax.tree_util.tree_unflatten(treedef, out)
