"""Decoding-time logit fusion: steering a large model's next-token logits with small tuned models.

No training happens here: these are pure functions of next-token logits ``[..., V]`` (``[B, V]`` at a
decoding step) of models that share one vocabulary, to be applied before sampling.

* :func:`proxy_tuning_logits` — Liu, Han, Wang, Tsvetkov, Choi & Smith, "Tuning Language Models by Proxy"
  (COLM 2024): ``z̃ = z_L + α·(z_tuned − z_untuned)``.
* :func:`dynamic_logits_fusion` — Fan, Lu, Wei, Tian, Qu, Chen & Cheng, "On Giant's Shoulders: Effortless
  Weak to Strong by Dynamic Logits Fusion" (NeurIPS 2024): per decoding step, the weights ``α_t`` of
  several experts' offsets are chosen by the paper's KL-matching search; :func:`dynamic_fusion_objective`
  is that search's objective.

Excluded entries (``-inf`` logits): an entry that the large model excludes stays excluded; an entry that
a small model (tuned or untuned) excludes is excluded from the result whenever that model's offset has a
non-zero weight (the offset ``log p_tuned − log p_untuned`` is ``−∞`` or undefined there). With every
weight 0 the result is exactly the large model's logits. NaN propagates.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_choice, check_number
from jaxkd.losses.core import Array, is_masked, kl_from_log_probs, log_softmax, to_float

__all__ = ["dynamic_fusion_objective", "dynamic_logits_fusion", "proxy_tuning_logits"]

#: The paper's search grid (Algorithm 1 in the appendix of Fan et al.: "[0.0, 2.0], step is 0.1").
DEFAULT_ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(21))

#: The largest number of candidate weight vectors ``search="grid"`` may evaluate per step.
MAX_GRID_CANDIDATES = 10_000


def _check_vocab(name_a: str, shape_a, name_b: str, shape_b) -> None:
    """Two logit shapes agree; a vocabulary mismatch names both sizes."""
    shape_a, shape_b = tuple(shape_a), tuple(shape_b)
    if not shape_a or not shape_b:
        raise ValueError(f"{name_a} and {name_b} must have a vocabulary axis, got shapes {shape_a} and {shape_b}")
    if shape_a[-1] != shape_b[-1]:
        raise ValueError(
            f"{name_a} and {name_b} disagree on the vocabulary size: {name_a} has {shape_a[-1]}, {name_b} has "
            f"{shape_b[-1]} (shapes {shape_a} and {shape_b}); logit arithmetic needs one shared vocabulary"
        )
    if shape_a != shape_b:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {shape_a} and {shape_b}")


def _arithmetic(large: Array, tuned: Array, untuned: Array, alpha: Array) -> Array:
    """``large + Σ_e α_e (tuned_e − untuned)`` with the module's exclusion rule.

    ``tuned`` is ``[E, ..., V]``, ``alpha`` is ``[E, ...]`` (broadcast over the vocabulary).
    """
    alpha = jnp.asarray(alpha, large.dtype)[..., None]
    active = alpha != 0
    excluded = is_masked(large) | jnp.any(active & (is_masked(tuned) | is_masked(untuned)[None]), axis=0)
    zero = lambda x: jnp.where(is_masked(x), 0.0, x)  # noqa: E731 — zero gradient at -inf entries
    offset = jnp.sum(alpha * (zero(tuned) - zero(untuned)[None]), axis=0)
    return jnp.where(excluded, -jnp.inf, zero(large) + offset)


def proxy_tuning_logits(large_logits: Array, tuned_logits: Array, untuned_logits: Array, *, alpha=1.0) -> Array:
    """Proxy-tuning: ``z̃ = z_L + α·(z_tuned − z_untuned)``, sampled as ``softmax(z̃)``.

    Liu et al., "Tuning Language Models by Proxy" (COLM 2024), Eq. 1 writes the product of experts
    ``p̃(x) ∝ p_L(x)·p_tuned(x)/p_untuned(x)``, i.e. ``softmax(s_L + s_tuned − s_untuned)`` with ``s`` the
    models' scores. The official code (``alisawuffles/proxy-tuning``, ``modeling/dexperts.py``) adds the raw
    next-token **logits** with the weight ``alpha`` (default 1), and so does this function. Adding
    log-softmax outputs instead gives the same distribution: each log-softmax is its logits minus a
    per-row constant, which ``softmax`` removes (tested); only the returned values differ by that
    constant.

    Args:
      large_logits: ``[..., V]`` of the large (untuned) model.
      tuned_logits, untuned_logits: ``[..., V]`` of the small tuned model and its untuned base.
      alpha: the offset's weight (a number; ``0`` returns ``large_logits`` exactly).

    Returns:
      The fused logits ``[..., V]`` in at least float32 (excluded entries ``-inf``, see the module doc).
    """
    _check_vocab("large_logits", np.shape(large_logits), "tuned_logits", np.shape(tuned_logits))
    _check_vocab("large_logits", np.shape(large_logits), "untuned_logits", np.shape(untuned_logits))
    check_number("alpha", alpha)
    large = to_float(large_logits)
    tuned, untuned = (jnp.asarray(x, large.dtype) for x in (tuned_logits, untuned_logits))
    return _arithmetic(large, tuned[None], untuned, jnp.asarray(alpha, large.dtype)[None])


def _check_fusion_inputs(large_logits, expert_logits, base_logits) -> int:
    if np.ndim(expert_logits) != np.ndim(large_logits) + 1:
        raise ValueError(
            "expert_logits must stack the experts on a leading axis, [E, ..., V] next to large_logits [..., V], "
            f"got shapes {np.shape(expert_logits)} and {np.shape(large_logits)}"
        )
    _check_vocab("large_logits", np.shape(large_logits), "base_logits", np.shape(base_logits))
    _check_vocab("large_logits", np.shape(large_logits), "expert_logits[e]", np.shape(expert_logits)[1:])
    num_experts = np.shape(expert_logits)[0]
    if num_experts < 1:
        raise ValueError("expert_logits needs at least one expert (got E = 0)")
    return num_experts


def _kl_targets(expert_logits: Array, base_logits: Array) -> tuple[Array, Array, Array]:
    log_q = log_softmax(base_logits)
    log_qe = log_softmax(expert_logits)
    return log_q, kl_from_log_probs(log_qe, log_q[None]), kl_from_log_probs(log_q[None], log_qe)


def _objective(large, experts, base, log_p, kl_expert_base, kl_base_expert, alphas) -> Array:
    """Eq. 5 of Fan et al. for weights ``alphas`` ``[E, ...]``; ``[...]``."""
    log_fused = log_softmax(_arithmetic(large, experts, base, alphas))
    forward = kl_from_log_probs(log_fused, log_p)  # KL(P̃ ‖ P)
    reverse = kl_from_log_probs(log_p, log_fused)  # KL(P ‖ P̃)
    return jnp.sum((forward[None] - kl_expert_base) ** 2 + (reverse[None] - kl_base_expert) ** 2, axis=0)


def dynamic_fusion_objective(large_logits: Array, expert_logits: Array, base_logits: Array, alphas: Array) -> Array:
    """The objective dynamic logits fusion minimizes over the weights ``α`` at one decoding step.

    Fan et al., "On Giant's Shoulders: Effortless Weak to Strong by Dynamic Logits Fusion" (NeurIPS 2024),
    Eq. 5 (the multi-expert form of Eq. 3; Algorithm 1 in the appendix)::

        P̃_α = softmax(z_L + Σ_t α_t (z_t − z_S))
        L(α) = Σ_t [ (KL(P̃_α ‖ P) − KL(Q_t ‖ Q))² + (KL(P ‖ P̃_α) − KL(Q ‖ Q_t))² ]

    with ``P = softmax(z_L)`` (large), ``Q = softmax(z_S)`` (the untuned small model), ``Q_t =
    softmax(z_t)`` (the ``t``-th tuned small expert): the large model should move away from its own
    distribution by as much as each expert moved away from the small base, in both KL directions.
    KL terms that would be ``+∞`` are dropped (:func:`jaxkd.losses.core.kl_from_log_probs`).

    Args:
      large_logits: ``[..., V]``.
      expert_logits: ``[E, ..., V]``, the tuned experts stacked on a leading axis.
      base_logits: ``[..., V]``, the untuned small model the experts were tuned from.
      alphas: ``[..., E]`` weights (the experts on the last axis).

    Returns:
      ``L(α)`` of shape ``[...]``.
    """
    num_experts = _check_fusion_inputs(large_logits, expert_logits, base_logits)
    expected = tuple(np.shape(large_logits)[:-1]) + (num_experts,)
    if np.shape(alphas) != expected:
        raise ValueError(f"alphas must have shape large_logits.shape[:-1] + (E,) = {expected}, got {np.shape(alphas)}")
    large = to_float(large_logits)
    experts, base = jnp.asarray(expert_logits, large.dtype), jnp.asarray(base_logits, large.dtype)
    log_q, kl_eb, kl_be = _kl_targets(experts, base)
    return _objective(large, experts, base, log_softmax(large), kl_eb, kl_be, jnp.moveaxis(jnp.asarray(alphas), -1, 0))


def _candidates(alpha_grid: Sequence[float], num_experts: int, search: str) -> np.ndarray:
    grid = np.asarray(alpha_grid, np.float64).reshape(-1)
    if grid.size == 0:
        raise ValueError("alpha_grid must hold at least one weight")
    for i, a in enumerate(grid):
        check_number(f"alpha_grid[{i}]", float(a))
    if search == "one_expert":
        # One expert active per candidate (the paper's multi-task search, O(n·T) candidates), expert-major.
        rows = np.zeros((num_experts * grid.size, num_experts))
        for t in range(num_experts):
            rows[t * grid.size:(t + 1) * grid.size, t] = grid
        return rows
    count = grid.size**num_experts
    if count > MAX_GRID_CANDIDATES:
        raise ValueError(
            f"search='grid' would evaluate {grid.size}^{num_experts} = {count} weight vectors per step "
            f"(limit {MAX_GRID_CANDIDATES}); use search='one_expert' (the paper's multi-expert search) or a "
            "coarser grid"
        )
    return np.asarray(list(itertools.product(grid, repeat=num_experts)), np.float64)


def dynamic_logits_fusion(
    large_logits: Array,
    expert_logits: Array,
    base_logits: Array,
    *,
    alpha_grid: Sequence[float] = DEFAULT_ALPHA_GRID,
    search: str = "one_expert",
) -> tuple[Array, Array]:
    """Dynamic logits fusion: the fused next-token logits with per-step weights chosen by search.

    Fan et al., "On Giant's Shoulders: Effortless Weak to Strong by Dynamic Logits Fusion" (NeurIPS 2024).
    At every decoding step (every row of ``[...]``) the weights ``α ∈ ℝ^E`` minimize
    :func:`dynamic_fusion_objective` over a finite candidate set, and the result is
    ``z_L + Σ_t α_t (z_t − z_S)``. The paper solves the problem by search (its Algorithm 1; the official
    repository ``Facico/Dynamic-Logit-Fusion`` holds no code), which this function follows:

    * candidates: weights from ``alpha_grid`` (default ``0.0, 0.1, …, 2.0``, the paper's "[0.0, 2.0], step
      0.1");
    * ``search="one_expert"`` (default, the paper's multi-task setting: "perform α search only for one
      task, for a total of T times"): the candidates activate one expert at a time, ``α = a·e_t``, so
      ``E·|grid|`` candidates; with one expert this is the plain single-expert search.
      ``search="grid"`` evaluates the full Cartesian product ``grid^E`` (the ``O(n^T)`` search the paper
      avoids; refused above :data:`MAX_GRID_CANDIDATES`).
    * the minimum is taken with a strict ``<`` over the candidates in order (expert-major, then the grid
      order), as in the pseudo-code: ties go to the first candidate.

    The search is a fixed, jittable computation (``[candidates, ..., V]`` work per step). The weights are
    piecewise constant in the inputs, so nothing is differentiated through the choice.

    Args:
      large_logits: ``[..., V]`` of the large model.
      expert_logits: ``[E, ..., V]``, tuned small experts stacked on a leading axis.
      base_logits: ``[..., V]`` of the untuned small model.
      alpha_grid: the weights each expert may take (Python numbers).
      search: ``"one_expert"`` or ``"grid"``.

    Returns:
      ``(fused_logits [..., V], alphas [..., E])``.
    """
    check_choice("search", search, ("one_expert", "grid"))
    num_experts = _check_fusion_inputs(large_logits, expert_logits, base_logits)
    large = to_float(large_logits)
    experts, base = jnp.asarray(expert_logits, large.dtype), jnp.asarray(base_logits, large.dtype)
    candidates = jnp.asarray(_candidates(alpha_grid, num_experts, search), large.dtype)  # [N, E]
    log_p = log_softmax(large)
    _, kl_eb, kl_be = _kl_targets(experts, base)
    batch_shape = large.shape[:-1]

    def one(alpha):  # alpha [E] -> objective [...]
        a = jnp.broadcast_to(alpha.reshape((num_experts,) + (1,) * len(batch_shape)), (num_experts,) + batch_shape)
        return _objective(large, experts, base, log_p, kl_eb, kl_be, a)

    objectives = jax.lax.map(one, candidates)  # [N, ...], one candidate at a time (bounded memory)
    best = jnp.argmin(objectives, axis=0)  # first minimum: the pseudo-code's strict '<'
    alphas = jax.lax.stop_gradient(candidates[best])  # [..., E]
    return _arithmetic(large, experts, base, jnp.moveaxis(alphas, -1, 0)), alphas
