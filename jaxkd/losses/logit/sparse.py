"""Top-k (sparse) teacher distributions: what offline distillation pipelines store, and KL against them.

An offline pipeline keeps, per position, the teacher's top-``k`` vocabulary indices and their
log-probabilities under the *full* vocabulary softmax (so ``Σ exp(log_probs) ≤ 1``); the remaining mass
``1 − Σ exp(log_probs)`` is the tail. :func:`topk_teacher` produces that pair from dense logits and
:func:`sparse_forward_kl` compares a dense student with it. Conventions (float32, ``-inf`` = zero mass,
dropped ``+∞`` terms, masked reductions) are those of :mod:`jaxkd.losses.logit.divergences`.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_choice, check_int, check_temperature, is_concrete
from jaxkd.losses.core import Array, is_masked, kl_from_log_probs, log_softmax, masked_logsumexp, per_example_loss

__all__ = ["sparse_forward_kl", "topk_teacher"]

Tail = Literal["drop", "bucket"]


def _check_k(k, vocab_size: int) -> int:
    k = check_int("k", k, low=1)
    if k > vocab_size:
        raise ValueError(f"k={k} is larger than the vocabulary ({vocab_size} classes); use k <= {vocab_size}")
    return k


def _log_sum(x: Array) -> Array:
    return masked_logsumexp(x, keepdims=True)


def _log1mexp(x: Array) -> Array:
    """``log(1 − e^x)`` for ``x ≤ 0`` (Mächler's switch at ``−log 2``); ``-inf`` where ``x ≥ 0`` (no mass left)."""
    ok = x < 0
    xs = jnp.where(ok, x, -1.0)
    near = xs > -jnp.log(2.0)
    value = jnp.where(
        near,
        jnp.log(-jnp.expm1(jnp.where(near, xs, -1.0))),
        jnp.log1p(-jnp.exp(jnp.where(near, -1.0, xs))),
    )
    return jnp.where(ok, value, jnp.where(jnp.isnan(x), jnp.nan, -jnp.inf))


def topk_teacher(teacher_logits: Array, k: int, *, temperature: float = 1.0) -> tuple[Array, Array]:
    """The teacher's ``k`` most probable classes and their log-probabilities over the full vocabulary.

    Returns ``(indices, log_probs)``, both ``[..., k]``, sorted by decreasing probability:
    ``log_probs = log_softmax(teacher_logits / T)[indices]`` (float32, normalized over *all* classes, the
    form offline pipelines such as DistillKit store). Masked (``-inf``) classes have
    ``log_probs = -inf`` if they are selected at all. Not differentiated in practice (the teacher is
    detached); the gradient is still finite.

    Args:
      teacher_logits: ``[..., V]``.
      k: ``1 <= k <= V``.
      temperature: ``T > 0``.
    """
    check_temperature("temperature", temperature)
    if jnp.ndim(teacher_logits) == 0:
        raise ValueError(f"teacher_logits must have a class axis, got shape {jnp.shape(teacher_logits)}")
    k = _check_k(k, jnp.shape(teacher_logits)[-1])
    log_p = log_softmax(teacher_logits, temperature)
    log_probs, indices = jax.lax.top_k(log_p, k)
    return indices.astype(jnp.int32), log_probs


def _check_sparse(student_logits: Array, topk_indices: Array, topk_log_probs: Array) -> None:
    s, i, v = jnp.shape(student_logits), jnp.shape(topk_indices), jnp.shape(topk_log_probs)
    if len(s) == 0:
        raise ValueError(f"student_logits must have a class axis, got shape {s}")
    if i != v:
        raise ValueError(f"topk_indices and topk_log_probs must have the same shape, got {i} and {v}")
    if len(i) != len(s) or i[:-1] != s[:-1]:
        raise ValueError(
            f"top-k arrays must have shape student_logits.shape[:-1] + (k,) = {s[:-1] + ('k',)}, got {i}"
        )
    _check_k(i[-1], s[-1])
    dtype = jnp.result_type(topk_indices)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"topk_indices must be integers, got dtype {dtype}")
    if is_concrete(topk_indices) and np.size(topk_indices):
        # On the host with NumPy: a concrete constant inside a jit trace must not be staged.
        idx = np.asarray(topk_indices)
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= s[-1]:
            bad = lo if lo < 0 else hi
            raise ValueError(f"top-k index {bad} is outside the vocabulary [0, {s[-1]})")
        ordered = np.sort(idx, axis=-1)
        if np.any(ordered[..., 1:] == ordered[..., :-1]):
            raise ValueError("topk_indices has a repeated index within a row; each row must list distinct classes")


@per_example_loss
def sparse_forward_kl(
    student_logits: Array,
    topk_indices: Array,
    topk_log_probs: Array,
    *,
    temperature: float = 1.0,
    tail: Tail = "drop",
) -> Array:
    """Forward KL ``KL(p_T ‖ p_S)`` against a sparse top-k teacher, per example.

    ``p_S = softmax(student_logits / T)`` over the full vocabulary; ``topk_log_probs`` are the teacher's
    full-vocabulary log-probabilities at the classes ``topk_indices`` (computed at the same ``T``, e.g. by
    :func:`topk_teacher`; ``T`` is applied to the student only). With ``K`` the top-k set:

    * ``tail="drop"``: both distributions are restricted to ``K`` and renormalized there,
      ``p̃_i = p_i / Σ_K p``, ``q̃_i = q_i / Σ_K q``, and the loss is ``KL(p̃ ‖ q̃)`` over the ``k``
      entries. It ignores how much mass the student puts outside ``K``. (DistillKit's
      ``MissingProbabilityHandling.ZERO`` renormalizes the teacher but not the student, which adds
      ``−log Σ_K q``; that variant is not implemented.)
    * ``tail="bucket"``: the tail is one extra category, teacher ``1 − Σ_K p`` against the student's exact
      mass outside ``K`` (summed over the non-top-k classes, not ``1 − Σ_K q``), and the loss is the KL
      between these ``k + 1``-category distributions — the value of DistillKit's
      ``MissingProbabilityHandling.SYMMETRIC_UNIFORM`` (tail spread uniformly over the same classes on both
      sides). It is a lower bound on the dense forward KL (data processing inequality).

    With ``k = V`` both equal the dense :func:`jaxkd.losses.forward_kl`. A teacher entry of ``-inf`` is zero
    mass; a top-k class the student masks (``-inf``) is dropped from the sum (module conventions).

    Args:
      student_logits: ``[..., V]``.
      topk_indices: integer ``[..., k]``, distinct per row, in ``[0, V)`` (checked when concrete).
      topk_log_probs: ``[..., k]`` teacher log-probabilities.
      temperature: ``T > 0`` for the student.
      tail: ``"drop"`` or ``"bucket"``.
    """
    check_temperature("temperature", temperature)
    check_choice("tail", tail, ("drop", "bucket"))
    _check_sparse(student_logits, topk_indices, topk_log_probs)
    idx = jnp.asarray(topk_indices)
    log_q_full = log_softmax(student_logits, temperature)
    log_q = jnp.take_along_axis(log_q_full, idx, axis=-1)
    log_p = jnp.asarray(topk_log_probs, log_q.dtype)
    if tail == "drop":
        lp = jnp.where(is_masked(log_p), -jnp.inf, log_p - _log_sum(log_p))
        lq = jnp.where(is_masked(log_q), -jnp.inf, log_q - _log_sum(log_q))
        return kl_from_log_probs(lp, lq)
    log_p_tail = _log1mexp(_log_sum(log_p))
    vocab_size = jnp.shape(log_q_full)[-1]
    flat_q = log_q_full.reshape(-1, vocab_size)
    flat_idx = idx.reshape(-1, idx.shape[-1])
    rows = jnp.arange(flat_q.shape[0])[:, None]
    in_topk = jnp.zeros(flat_q.shape, bool).at[rows, flat_idx].set(True).reshape(log_q_full.shape)
    log_q_tail = _log_sum(jnp.where(in_topk, -jnp.inf, log_q_full))
    return kl_from_log_probs(
        jnp.concatenate([log_p, log_p_tail], axis=-1), jnp.concatenate([log_q, log_q_tail], axis=-1)
    )


