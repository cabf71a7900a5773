"""Twin-Merging: a shared merge plus each expert's low-rank exclusive knowledge, mixed per input by a router.

Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging" (NeurIPS 2024); official
code LZY-the-boys/Twin-Merging (``generative/eval_twin.py``, ``generative/merge.py``, ``generative/sparsify.py``,
``discriminative/router.py``).

Offline (:func:`twin_compress`), from a base ``θ0`` and experts ``θ1..θE``:

* shared knowledge: a merge ``θ*`` of the experts — the official default is task arithmetic,
  ``θ* = θ0 + λ Σᵢ (θᵢ − θ0)`` with ``λ = 0.3`` (``generative/config/twin_merge.yml``: ``second_merge_method:
  task_arithmetic``, ``scaling: 0.3``; 0.29 in the discriminative config);
* exclusive knowledge: ``θᵢ − θ*`` (= the task vector ``τᵢ`` minus the shared delta ``θ* − θ0``), compressed
  per matrix leaf by a truncated SVD to rank ``r``: ``θᵢ − θ* ≈ Uᵢ,r diag(Sᵢ,r) Vᵢ,rᵀ``, stored as the factors
  ``usᵢ = Uᵢ,r diag(Sᵢ,r)`` and ``vsᵢ = Vᵢ,r``. ``r`` is one rank for every leaf (``rank=``: the generative
  runs' ``sparsify.svd(..., new_rank=8)``) or a fraction of each leaf's singular values (``density=``:
  ``r = int(density · min(m, n))``, the discriminative runs' ``sparsify.svd(p, 1 - mask_rate)`` with
  ``mask_rate = 0.9``, i.e. ``density = 0.1``; a leaf whose ``r`` rounds to 0 loses its exclusive part, as
  there).
  Leaves of rank 0 or 1 (biases, norms) are kept dense and exact, as the official ``svd`` returns 1-D tensors
  unchanged. A leaf of rank > 2 (a conv kernel ``[kh, kw, cin, cout]``) is compressed as the matrix
  ``[kh·kw·cin, cout]`` (Flax kernels keep the output features last); the official code only meets 2-D
  (LoRA / linear) weights.

Online, per input ``x``: a router reads the shared model's representation of ``x`` (the official code: the mean
over tokens of the last hidden state; here a named feature of the shared model, mean-pooled over every axis
between the batch and the last one) and returns logits over the experts; their softmax ``r(x)`` gives the
parameters ``θ(x) = θ* + Σᵢ rᵢ(x) usᵢ vsᵢᵀ`` (:func:`twin_merged_params`), and the model runs with them
(:func:`twin_apply`). The router (:class:`TwinRouter`, the official ``SimpleMLP``) is trained with cross-entropy
to predict which expert's task each example of a small labeled validation set comes from
(:func:`train_twin_router`).

Cost of per-input merging (:func:`twin_apply`): every example gets its own parameters, so a batch of ``B``
examples materializes ``B`` copies of the model's parameters (``B·P`` memory under ``vmap``; ``batch_size=k``
bounds it to ``k·P`` with a sequential ``lax.map``), plus ``E·r·(m + n)`` multiply-adds per example and matrix
leaf to expand the factors — next to ``B`` forward passes that can no longer share one weight matrix.
The official code does the same one example at a time (batch size 1 at inference).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxkd.checks import check_int, check_number
from jaxkd.merging.trees import _path, check_count, check_same_structure, compute_dtype, like_base
from jaxkd.models.base import Model, get_feature

PyTree = Any
Array = jax.Array

#: Task arithmetic's scaling λ for the shared model in the official generative configuration.
DEFAULT_SCALING = 0.3


@flax.struct.dataclass
class LowRank:
    """One matrix leaf's exclusive knowledge for every expert: ``θᵢ − θ* ≈ us[i] @ vs[i].T`` (reshaped to
    ``shape``).

    Attributes:
      us: ``[experts, m, r]``, the left singular vectors times the singular values.
      vs: ``[experts, n, r]``, the right singular vectors.
      shape: the leaf's shape (``m·n`` values: ``m`` is the product of every axis but the last).
    """

    us: Array
    vs: Array
    shape: tuple = flax.struct.field(pytree_node=False)

    def delta(self, weights: Array) -> Array:
        """``Σᵢ weights[i] · us[i] @ vs[i].T`` in the leaf's shape (the factors' precision)."""
        return jnp.einsum("e,emr,enr->mn", weights.astype(self.us.dtype), self.us, self.vs).reshape(self.shape)


@flax.struct.dataclass
class TwinVectors:
    """The shared model and every expert's exclusive knowledge, from :func:`twin_compress`.

    Attributes:
      shared: ``θ*``, a params pytree with base's structure and dtypes.
      exclusive: base's structure with, at each leaf, a :class:`LowRank` (leaves of rank >= 2) or the dense
        stack ``[experts, *leaf.shape]`` of ``θᵢ − θ*`` (leaves of rank 0 or 1), in the working precision
        (float32; float64 for float64 inputs).
      num_experts: ``E`` (static).
      rank: ``r`` when one rank was given, else ``None`` (static).
      density: the fraction of singular values kept per leaf when given instead, else ``None`` (static).
    """

    shared: PyTree
    exclusive: PyTree
    num_experts: int = flax.struct.field(pytree_node=False)
    rank: int | None = flax.struct.field(pytree_node=False, default=None)
    density: float | None = flax.struct.field(pytree_node=False, default=None)


def _task_arithmetic(base: PyTree, models: Sequence[PyTree], scaling: float) -> PyTree:
    """``θ0 + λ Σᵢ (θᵢ − θ0)`` (the official ``MergingMethod.task_arithmetic``), in base's dtypes."""
    def merge(b, *ms):
        dt = compute_dtype(b)
        b32 = jnp.asarray(b, dt)
        return like_base(b32 + scaling * sum(jnp.asarray(m, dt) - b32 for m in ms), b)

    return jax.tree.map(merge, base, *models)


def _shared_model(base: PyTree, models: Sequence[PyTree], shared: Any, scaling: float) -> PyTree:
    if isinstance(shared, str):
        if shared != "task_arithmetic":
            raise ValueError(f"twin_compress: shared must be 'task_arithmetic', a function (base, models) -> params "
                             f"(e.g. a TIES merge) or a merged params pytree, got {shared!r}")
        return _task_arithmetic(base, models, scaling)
    merged = shared(base, models) if callable(shared) else shared
    check_same_structure(base, [merged], method="twin_compress (the shared model)")
    return merged


def _matrix_shape(shape: tuple) -> tuple[int, int]:
    return int(np.prod(shape[:-1])), int(shape[-1])


def twin_compress(base: PyTree, models: Sequence[PyTree], *, rank: int | None = None, density: float | None = None,
                  shared: Any = "task_arithmetic", scaling: float = DEFAULT_SCALING) -> TwinVectors:
    """The shared model ``θ*`` and each expert's exclusive knowledge ``θᵢ − θ*``, truncated to low rank.

    Args:
      base: the pre-trained parameters ``θ0``.
      models: at least two fine-tuned experts with base's structure.
      rank: one rank ``r >= 1`` for every matrix leaf, at most the smaller side of each (an ``[m, n]`` leaf has
        ``min(m, n)`` singular values; the official slicing silently keeps fewer there, jaxkd refuses).
      density: instead of ``rank``, the fraction ``0 < density <= 1`` of each matrix leaf's singular values to
        keep, ``r = int(density · min(m, n))`` (the official discriminative setting: 0.1). Give exactly one.
      shared: ``"task_arithmetic"`` (the official default: ``θ0 + scaling · Σ τᵢ``); a function
        ``(base, models) -> params`` such as a TIES merge with its hyper-parameters bound
        (``functools.partial``); or an already merged params pytree (the official ``--share_expert``).
      scaling: task arithmetic's ``λ`` (0.3, the official generative configuration; 0.29 discriminative).

    Returns a :class:`TwinVectors`. Pure and jittable with ``rank``/``density``, ``shared`` and ``scaling``
    static.

    Raises:
      ValueError: fewer than two experts, models or the shared model not of base's structure and shapes, both
        or neither of ``rank`` and ``density``, a ``rank`` below 1 or above a matrix leaf's smaller side, a
        ``density`` outside ``(0, 1]``, an unknown ``shared``.
    """
    check_count(models, 2, "twin_compress")
    if (rank is None) == (density is None):
        raise ValueError(f"twin_compress: give exactly one of rank= (one rank for every leaf) and density= (a fraction "
                         f"of each leaf's singular values), got rank={rank!r}, density={density!r}")
    if rank is not None:
        rank = check_int("rank", rank, low=1)
    else:
        check_number("density", density, low=0.0, high=1.0, low_open=True)
    check_number("scaling", scaling)
    check_same_structure(base, models, method="twin_compress")
    for path, leaf in jax.tree_util.tree_flatten_with_path(base)[0]:
        if rank is not None and np.ndim(leaf) >= 2 and rank > min(_matrix_shape(np.shape(leaf))):
            m, n = _matrix_shape(np.shape(leaf))
            raise ValueError(f"twin_compress: rank={rank} exceeds the smaller side of {_path(path)!r} "
                             f"(shape {tuple(np.shape(leaf))}, compressed as a {m}x{n} matrix: at most {min(m, n)})")
    merged = _shared_model(base, models, shared, scaling)

    def exclusive(shared_leaf, *experts):
        dt = compute_dtype(shared_leaf)
        deltas = jnp.stack([jnp.asarray(e, dt) for e in experts]) - jnp.asarray(shared_leaf, dt)[None]
        shape = tuple(np.shape(shared_leaf))
        if len(shape) < 2:
            return deltas  # kept dense and exact (the official svd returns 1-D tensors unchanged)
        matrix = _matrix_shape(shape)
        r = rank if rank is not None else int(density * min(matrix))
        u, s, vh = jnp.linalg.svd(deltas.reshape(len(experts), *matrix), full_matrices=False)
        return LowRank(us=u[..., :r] * s[:, None, :r], vs=jnp.swapaxes(vh[:, :r, :], 1, 2), shape=shape)

    return TwinVectors(shared=merged, exclusive=jax.tree.map(exclusive, merged, *models),
                       num_experts=len(models), rank=rank, density=density)


def twin_merged_params(twin: TwinVectors, router_weights: Array) -> PyTree:
    """``θ* + Σᵢ rᵢ usᵢ vsᵢᵀ`` for one input's router weights ``r`` (shape ``[experts]``), in base's dtypes.

    The weights are used as given (:func:`twin_router_weights` gives the softmax the official code applies).
    """
    if np.ndim(router_weights) != 1 or np.shape(router_weights)[0] != twin.num_experts:
        raise ValueError(f"twin_merged_params: router weights must have shape [{twin.num_experts}] (one per expert) "
                         f"for one input, got shape {tuple(np.shape(router_weights))}")

    def merge(shared_leaf, excl):
        if isinstance(excl, LowRank):
            delta = excl.delta(router_weights)
        else:
            delta = jnp.tensordot(router_weights.astype(excl.dtype), excl, axes=1)
        return like_base(jnp.asarray(shared_leaf, delta.dtype) + delta, shared_leaf)

    # exclusive is flattened up to shared's leaves, so each LowRank reaches `merge` whole.
    return jax.tree.map(merge, twin.shared, twin.exclusive)


class TwinRouter(nn.Module):
    """The router: an MLP from an input's representation ``[batch, D]`` to logits over the experts.

    The official ``SimpleMLP`` (``discriminative/router.py``): two hidden layers of width ``2·D``, each
    ``Linear → BatchNorm1d → leaky_relu → Dropout(0.5)``, then ``Linear(num_experts)``. ``hidden=None`` gives
    those widths; ``hidden=()`` a linear router. jaxkd leaves out the batch norm (the router is applied to one
    input at a time at inference, where only running statistics would apply).

    Attributes:
      num_experts: ``E``.
      hidden: hidden widths (``None``: ``(2·D, 2·D)`` as the official router).
      dropout: the dropout rate after each hidden layer (0.5 officially); used only with ``train=True``.
    """

    num_experts: int
    hidden: Sequence[int] | None = None
    dropout: float = 0.5

    @nn.compact
    def __call__(self, features: Array, train: bool = False) -> Array:
        h = jnp.asarray(features, jnp.float32)
        widths = (2 * h.shape[-1],) * 2 if self.hidden is None else tuple(self.hidden)
        for i, width in enumerate(widths):
            h = nn.leaky_relu(nn.Dense(width, name=f"hidden_{i}")(h))  # torch's default slope, 0.01
            h = nn.Dropout(self.dropout)(h, deterministic=not train)
        return nn.Dense(self.num_experts, name="out")(h)


def _check_router(router: TwinRouter, num_experts: int | None = None) -> None:
    if not isinstance(router, TwinRouter):
        raise ValueError(f"router must be a TwinRouter, got {type(router).__name__}")
    if num_experts is not None and router.num_experts != num_experts:
        raise ValueError(f"the router routes over {router.num_experts} experts, the twin vectors hold {num_experts}")


def twin_router_features(model: Model, twin: TwinVectors, x: Any, *, feature: str,
                         model_state: PyTree | None = None) -> Array:
    """The router's input: the shared model's feature ``feature`` on ``x``, mean-pooled to ``[batch, D]``.

    The official router reads the mean over tokens of the shared model's last hidden state; a feature of
    shape ``[batch, ..., D]`` is averaged over every axis between the batch and the last (tokens, or an
    image's height and width). ``model_state``: the model's other collections (e.g. ``batch_stats``).
    """
    out = model.apply({"params": twin.shared, **dict(model_state or {})}, x, train=False)
    h = jnp.asarray(get_feature(out, feature, who="shared model"), jnp.float32)
    if h.ndim < 2:
        raise ValueError(f"the shared model's feature {feature!r} must be [batch, ..., D], got shape {h.shape}")
    return h.mean(axis=tuple(range(1, h.ndim - 1))) if h.ndim > 2 else h


def twin_router_weights(router: TwinRouter, router_params: PyTree, features: Array) -> Array:
    """``softmax(router(features))`` over the experts: ``[batch, experts]`` float32 (eval mode, no dropout)."""
    _check_router(router)
    logits = router.apply({"params": router_params}, features, train=False)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def twin_router_loss(router: TwinRouter, router_params: PyTree, features: Array, expert_labels: Array, *,
                     rng: Array | None = None) -> Array:
    """Mean cross-entropy of the router's logits against each example's expert index (dropout with ``rng``)."""
    train = rng is not None
    logits = router.apply({"params": router_params}, features, train=train,
                          rngs={"dropout": rng} if train else {})
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), expert_labels).mean()


def train_twin_router(router: TwinRouter, features: Array, expert_labels: Array, *, rng: Array, steps: int = 200,
                      learning_rate: float = 5e-4, batch_size: int | None = None) -> PyTree:
    """Trains the router to predict each example's expert (task) index from its features; returns its params.

    As the official ``train_router``: cross-entropy, AdamW with learning rate 5e-4 (no weight decay) decayed
    linearly to 0 (the Hugging Face Trainer's defaults). The official run trains 50 epochs at batch size 1024
    and keeps the checkpoint with the best held-out accuracy; here ``steps`` updates, each on a random batch of
    ``batch_size`` examples (``None``: every example), all in one compiled ``lax.scan``.

    Args:
      router: a :class:`TwinRouter` over the experts.
      features: ``[n, D]`` representations (:func:`twin_router_features` of a labeled validation set).
      expert_labels: ``[n]`` integers in ``[0, experts)``: which expert's task each example belongs to.
    """
    _check_router(router)
    steps = check_int("steps", steps, low=1)
    check_number("learning_rate", learning_rate, low=0.0, low_open=True)
    features = jnp.asarray(features, jnp.float32)
    labels = jnp.asarray(expert_labels)
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"train_twin_router: features must be [n, D] and expert_labels [n], got "
                         f"{features.shape} and {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"train_twin_router: expert_labels must be integers, got {labels.dtype}")
    if isinstance(labels, jax.Array) and not isinstance(labels, jax.core.Tracer):
        if int(labels.min()) < 0 or int(labels.max()) >= router.num_experts:
            raise ValueError(f"train_twin_router: expert_labels must lie in [0, {router.num_experts}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
    n = features.shape[0]
    batch = n if batch_size is None else min(check_int("batch_size", batch_size, low=1), n)
    init_rng, loop_rng = jax.random.split(rng)
    params = router.init(init_rng, features[:1])["params"]
    tx = optax.adamw(optax.linear_schedule(learning_rate, 0.0, steps), weight_decay=0.0)

    def step(carry, key):
        params, opt_state = carry
        pick, drop = jax.random.split(key)
        idx = jnp.arange(n) if batch == n else jax.random.choice(pick, n, (batch,), replace=False)
        grads = jax.grad(lambda p: twin_router_loss(router, p, features[idx], labels[idx], rng=drop))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    @jax.jit
    def run(params, key):
        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, steps))
        return params

    return run(params, loop_rng)


def twin_apply(model: Model, twin: TwinVectors, router: TwinRouter, router_params: PyTree, x: Any, *,
               feature: str, model_state: PyTree | None = None, batch_size: int | None = None) -> Array:
    """Twin-Merging's prediction: each example runs with its own merged parameters ``θ(x)``; returns the logits.

    The router weights come from the shared model's feature ``feature`` (:func:`twin_router_features`), the
    parameters from :func:`twin_merged_params`, one set per example (``vmap``; ``batch_size=k``: ``lax.map``
    over groups of ``k`` examples, bounding the memory to ``k`` parameter copies). See the module docstring
    for the cost. ``x``: an array ``[batch, ...]`` or a pytree of them.
    """
    _check_router(router, twin.num_experts)
    state = dict(model_state or {})
    weights = twin_router_weights(router, router_params, twin_router_features(model, twin, x, feature=feature,
                                                                              model_state=state))

    def one(args):
        w, xi = args
        params = twin_merged_params(twin, w)
        xi = jax.tree.map(lambda a: a[None], xi)
        return model.apply({"params": params, **state}, xi, train=False).logits[0]

    if batch_size is None:
        return jax.vmap(lambda w, xi: one((w, xi)))(weights, x)
    return jax.lax.map(one, (weights, x), batch_size=check_int("batch_size", batch_size, low=1))


__all__ = ["DEFAULT_SCALING", "LowRank", "TwinRouter", "TwinVectors", "train_twin_router", "twin_apply",
           "twin_compress", "twin_merged_params", "twin_router_features", "twin_router_loss", "twin_router_weights"]
