"""SinKD (Cui, Zhou, Zhao, Yang & Xu, "SinKD: Sinkhorn Distance Minimization for Knowledge Distillation",
LREC-COLING 2024)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd.checks import check_int, check_positive, check_same_logits, check_temperature
from jaxkd.losses.core import (
    Array,
    Reduction,
    check_batch_reduction,
    example_weights,
    log_softmax,
    masked_logsumexp,
    probs,
)

__all__ = ["sinkd", "sinkhorn_plan"]


def sinkhorn_plan(
    student_logits: Array,
    teacher_logits: Array,
    *,
    temperature: float = 2.0,
    epsilon: float = 0.1,
    iterations: int = 20,
    mask: Array | None = None,
    weights: Array | None = None,
) -> tuple[Array, Array]:
    """The entropic transport plan ``P`` ``[N, N]`` and cost ``W`` ``[N, N]`` of :func:`sinkd`.

    Leading axes are flattened to ``N`` examples. Marginals: ``a = b = w / Σ w`` with ``w = mask·weights``
    (uniform ``1/N`` by default; a masked example has zero mass, so its row and column of ``P`` are 0).
    """
    check_temperature("temperature", temperature)
    check_positive("epsilon", epsilon)
    iterations = check_int("iterations", iterations, low=1)
    check_same_logits(student_logits, teacher_logits)
    shape = jnp.shape(student_logits)
    num_classes = shape[-1]
    ps = probs(log_softmax(student_logits, temperature)).reshape(-1, num_classes)
    pt = probs(log_softmax(teacher_logits, temperature)).reshape(-1, num_classes)
    w = example_weights(shape[:-1], mask, weights, ps.dtype).reshape(-1)
    cost = jnp.sum(jnp.abs(ps[:, None, :] - pt[None, :, :]), axis=-1)  # W_ij = ‖p_s,i − p_t,j‖₁

    total = jnp.sum(w)
    marginal = jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)
    valid = marginal > 0
    log_m = jnp.log(jnp.where(valid, marginal, 1.0))
    pair = valid[:, None] & valid[None, :]
    neg_cost = -cost / epsilon

    def body(_, fg):
        f, g = fg
        # Row update, then column update (the official loop normalizes rows, then columns).
        f = jnp.where(valid, log_m - masked_logsumexp(neg_cost + g[None, :], pair, axis=1), 0.0)
        g = jnp.where(valid, log_m - masked_logsumexp(neg_cost + f[:, None], pair, axis=0), 0.0)
        return f, g

    zeros = jnp.zeros_like(marginal)
    f, g = jax.lax.fori_loop(0, iterations, body, (zeros, zeros))
    plan = jnp.where(pair, jnp.exp(jnp.where(pair, neg_cost + f[:, None] + g[None, :], 0.0)), 0.0)
    return plan, cost


def sinkd(
    student_logits: Array,
    teacher_logits: Array,
    *,
    temperature: float = 2.0,
    epsilon: float = 0.1,
    iterations: int = 20,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Batch-wise Sinkhorn distance (Cui, Zhou, Zhao, Yang & Xu, "SinKD: Sinkhorn Distance Minimization for
    Knowledge Distillation", LREC-COLING 2024; extended in IEEE TNNLS).

    With ``p_s,i = softmax(z_s,i/T)`` and ``p_t,j = softmax(z_t,j/T)``, the cost between *examples* is
    ``W_ij = ‖p_s,i − p_t,j‖₁`` (``[B, B]``) and the loss is the paper's transport cost ``Σ_ij P_ij W_ij``
    of the entropic plan ``P = diag(u) exp(−W/ε) diag(v)`` after a **fixed** number of Sinkhorn iterations
    (a ``jax.lax.fori_loop``; gradients flow through every iteration, as in the official code).

    The iterations run in the log domain (potentials ``f = log u``, ``g = log v`` updated with
    log-sum-exp), so small ``ε`` does not underflow ``exp(−W/ε)``; they are algebraically the same
    row-then-column normalizations as the official loop (``2018cx/SinKD``, ``loss.py``, ``Sinkhorn``).

    Marginals: uniform ``1/B`` on both sides (``P`` is a joint distribution and the loss an average
    transport cost, comparable across batch sizes). The official code normalizes rows and columns to
    **1** instead; every iterate is then exactly ``B`` times ours, so the official value is ``B ×`` this one
    (tested). ``mask`` gives masked examples zero mass on both sides; ``weights`` make the marginals
    proportional to them.

    Variant: what the paper states. The released training script builds the Sinkhorn module but never
    adds it to the loss, so there is no working reference combination; the official term
    weight (0.001 on GLUE) belongs in the method's ``weight``. Defaults: ``T = 2`` (hard-coded in the
    official class), ``ε = 0.1``, 20 iterations; no ``T²`` factor. Memory is ``O(B²·C)`` for the cost.
    Batch-level: only ``reduction="mean"``.
    """
    check_batch_reduction("sinkd", reduction)
    plan, cost = sinkhorn_plan(
        student_logits, teacher_logits, temperature=temperature, epsilon=epsilon, iterations=iterations,
        mask=mask, weights=weights,
    )
    return jnp.sum(plan * cost)
