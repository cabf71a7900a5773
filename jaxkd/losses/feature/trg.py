"""TRG: knowledge distillation via a token-level relationship graph (local, global and contextual terms).

Zhang, Liu & He, "Knowledge Distillation via Token-level Relationship Graph", arXiv:2306.12442, 2023.
Tokens are ``[B, N, D]`` (ViT patch tokens, or a CNN feature map cut into patches by
:func:`patch_tokens`); the student's and the teacher's token sets correspond position by position.

No official code was found; the three terms follow the paper's equations:

* local preserving loss ``L_local`` (:func:`trg_local`): a k-NN graph over all tokens of the batch in
  each network, ``A_ij = exp(−‖T_i − T_j‖² / (2σ))`` for ``j`` among the ``k`` nearest tokens of ``i``,
  else 0, and the KL between the row-softmaxes of the teacher's and the student's graph;
* global relationship loss ``L_global`` (:func:`trg_global`): token-level InfoNCE between the (linearly
  projected) student tokens and the teacher tokens of the batch, the same token as the positive;
* contextual loss ``L_inner`` (:func:`trg_contextual`): inside each image,
  ``CS = softmax(F Fᵀ / √D)`` over its tokens, matched by MSE between teacher and student.

The total is ``L_logit + α L_inner + β L_local + γ L_global`` (the method, :func:`jaxkd.methods.trg`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_int, check_positive, check_temperature
from jaxkd.losses.core import (
    Array,
    kl_from_log_probs,
    l2_normalize,
    log_softmax,
    per_example_loss,
    relational_loss,
    to_float,
)

__all__ = ["patch_tokens", "trg_contextual", "trg_global", "trg_local"]


def patch_tokens(x: Array, patch_size: int = 1) -> Array:
    """Tokens ``[B, N, D]`` of a feature: a token sequence ``[B, N, D]`` as it is; an NHWC map cut into
    non-overlapping ``p × p`` patches, each flattened (``[B, (H/p)(W/p), p·p·C]``, row-major patches);
    an embedding ``[B, D]`` is one token. Not a loss (a helper of TRG and its method)."""
    p = check_int("patch_size", patch_size, low=1)
    x = jnp.asarray(x)
    if x.ndim == 2:
        return x[:, None, :]
    if x.ndim == 3:
        if p != 1:
            raise ValueError(f"patch_size applies to NHWC maps, got patch_size={p} for tokens of shape {x.shape}")
        return x
    if x.ndim != 4:
        raise ValueError(f"features must be [B, D], [B, N, D] or [B, H, W, C], got shape {x.shape}")
    b, h, w, c = x.shape
    if h % p or w % p:
        raise ValueError(f"patch_size={p} must divide the map's height and width, got a map of shape {x.shape}")
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def _pair(student_tokens, teacher_tokens, *, same_dim: bool = False) -> tuple[Array, Array]:
    s, t = np.shape(student_tokens), np.shape(teacher_tokens)
    if len(s) != 3 or len(t) != 3 or s[:2] != t[:2] or (same_dim and s[2] != t[2]):
        want = "the same shape" if same_dim else "the same batch and token count"
        raise ValueError(
            f"student and teacher tokens must be [B, N, D] of {want}, got student_tokens {s} and teacher_tokens {t}"
        )
    s, t = to_float(student_tokens), to_float(teacher_tokens)
    dtype = jnp.promote_types(s.dtype, t.dtype)
    return s.astype(dtype), t.astype(dtype)


def _token_validity(example_weights: Array, n: int) -> Array:
    return jnp.repeat(example_weights > 0, n)


def _mean_over(values: Array, valid: Array) -> Array:
    count = jnp.sum(valid)
    return jnp.where(count > 0, jnp.sum(jnp.where(valid, values, 0.0)) / jnp.maximum(count, 1), 0.0)


def _graph_log_probs(x: Array, valid: Array, k: int, sigma: float) -> Array:
    """Row-wise ``log softmax_j A_ij`` of the k-NN Gaussian graph over tokens ``x [M, D]``; self and invalid
    tokens are excluded (``-inf``)."""
    m = x.shape[0]
    sq = jnp.sum(x * x, axis=-1)
    d = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
    others = valid[:, None] & valid[None, :] & ~jnp.eye(m, dtype=bool)
    kk = min(k, m - 1) if m > 1 else 1
    ranked = jnp.where(others, jax.lax.stop_gradient(d), jnp.inf)
    kth = -jax.lax.top_k(-ranked, kk)[0][:, -1:]  # the k-th smallest distance (inf when fewer others)
    neighbour = others & ((ranked <= kth) | jnp.isnan(ranked))  # NaN propagates, never silently dropped
    a = jnp.where(neighbour, jnp.exp(-d / (2.0 * sigma)), 0.0)
    return log_softmax(jnp.where(others, a, -jnp.inf))


@relational_loss
def trg_local(
    student_tokens: Array,
    teacher_tokens: Array,
    *,
    k: int = 8,
    sigma: float = 1.0,
    normalize: bool = True,
    example_weights: Array,
) -> Array:
    """TRG's local preserving loss (Zhang, Liu & He, "Knowledge Distillation via Token-level Relationship
    Graph", 2023), over all tokens of the batch.

    Each network's tokens (``l2``-normalized when ``normalize``) form a k-NN graph
    ``A_ij = exp(−‖T_i − T_j‖² / (2σ))`` when ``j`` is one of the ``k`` nearest tokens of ``i`` (``j ≠ i``),
    else 0; ``P_i = softmax_{j≠i}(A_ij)`` and

    ``L_local = mean_i KL(P^T_i ‖ P^S_i)``.

    The student's and the teacher's graphs each use their own neighbours (the selection carries no
    gradient). Assumptions where the paper leaves room (no official code): the KL runs from the teacher's
    graph to the student's (the usual distillation direction), tokens are normalized so that ``σ`` has a
    scale independent of the feature norm, and the sum over tokens is a mean.

    Args:
      student_tokens: ``[B, N, D_s]``; teacher_tokens: ``[B, N, D_t]`` (own spaces, no projection).
      k: neighbours per token; sigma: the Gaussian kernel's ``σ``; normalize: ``l2``-normalize tokens.
    """
    k = check_int("k", k, low=1)
    check_positive("sigma", sigma)
    s, t = _pair(student_tokens, teacher_tokens)
    b, n = s.shape[:2]
    if normalize:
        s, t = l2_normalize(s), l2_normalize(t)
    valid = _token_validity(example_weights, n)
    log_ps = _graph_log_probs(s.reshape(b * n, -1), valid, k, sigma)
    log_pt = _graph_log_probs(t.reshape(b * n, -1), valid, k, sigma)
    return _mean_over(kl_from_log_probs(log_pt, log_ps), valid)


@relational_loss
def trg_global(
    student_tokens: Array, teacher_tokens: Array, *, temperature: float = 0.1, example_weights: Array
) -> Array:
    """TRG's global relationship loss (Zhang, Liu & He, 2023): InfoNCE between tokens of the batch,

    ``L_global = −mean_i log [ exp(cos(S_i, T_i)/τ) / Σ_j exp(cos(S_i, T_j)/τ) ]``

    over all ``M = B·N`` tokens (``j`` runs over every token of every valid example; the positive is the
    same token in the teacher). ``student_tokens`` are already projected to the teacher's width (the
    method's linear connector). The paper lowers ``τ`` during training (coarse to fine); the method takes
    a schedule.

    Args:
      student_tokens, teacher_tokens: ``[B, N, D]``.
      temperature: ``τ``.
    """
    check_temperature("temperature", temperature)
    s, t = _pair(student_tokens, teacher_tokens, same_dim=True)
    b, n, _ = s.shape
    valid = _token_validity(example_weights, n)
    s, t = l2_normalize(s).reshape(b * n, -1), l2_normalize(t).reshape(b * n, -1)
    logits = jnp.where(valid[None, :], (s @ t.T) / temperature, -jnp.inf)
    log_p = log_softmax(logits)
    return _mean_over(-jnp.where(valid, jnp.diagonal(log_p), 0.0), valid)


@per_example_loss
def trg_contextual(student_tokens: Array, teacher_tokens: Array) -> Array:
    """TRG's contextual (inner-instance) loss (Zhang, Liu & He, 2023), per example:

    ``CS = softmax_j(F_i · F_j / √D)`` over the ``N`` tokens of one image, in each network's own space
    (``D`` its width), and ``L_inner = mean_{i,j} (CS^T_ij − CS^S_ij)²``.

    Args:
      student_tokens: ``[B, N, D_s]``; teacher_tokens: ``[B, N, D_t]``.
    """
    s, t = _pair(student_tokens, teacher_tokens)

    def context(x):
        return jax.nn.softmax(jnp.einsum("bnd,bmd->bnm", x, x) / np.sqrt(x.shape[-1]), axis=-1)

    diff = context(t) - context(s)
    return jnp.mean(diff * diff, axis=(-2, -1))
