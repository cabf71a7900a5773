"""Forward KL, reverse KL and GKD's generalized JSD over a top-k support, with a tail bucket or renormalized."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from jaxkd.checks import check_choice, check_in_range, check_int, check_same_logits, check_temperature, is_concrete
from jaxkd.losses.core import Array, kl_from_log_probs, log_mixture, log_softmax, masked_logsumexp, per_example_loss

__all__ = ["topk_generalized_jsd"]

Support = Literal["auto", "teacher", "student", "union"]
Tail = Literal["bucket", "drop"]
SUPPORTS = ("auto", "teacher", "student", "union")


def _topk_member(logits: Array, k: int) -> Array:
    """Boolean ``[..., V]``: the ``k`` classes ``jax.lax.top_k`` picks (ties broken by the lower index)."""
    _, idx = jax.lax.top_k(logits, k)
    vocab_size = logits.shape[-1]
    flat_idx = idx.reshape(-1, k)
    rows = jnp.arange(flat_idx.shape[0])[:, None]
    member = jnp.zeros((flat_idx.shape[0], vocab_size), bool).at[rows, flat_idx].set(True)
    return member.reshape(logits.shape)


def _gjsd(log_s: Array, log_t: Array, beta: float) -> Array:
    """TRL's ``_jsd_divergence`` summed over the last axis: the endpoints are the two KLs."""
    if beta == 0.0:
        return kl_from_log_probs(log_t, log_s)
    if beta == 1.0:
        return kl_from_log_probs(log_s, log_t)
    log_m = log_mixture(log_t, log_s, beta)
    return beta * kl_from_log_probs(log_t, log_m) + (1.0 - beta) * kl_from_log_probs(log_s, log_m)


def _finite(lse: Array) -> Array:
    """A normalizer of ``-inf`` (no mass on the support) as 0, so the entries stay ``-inf`` instead of NaN."""
    return jnp.where(lse == -jnp.inf, 0.0, lse)


def resolve_support(support: str, beta: float) -> str:
    """``"auto"`` is TRL's rule: the teacher's top-k for ``β = 0`` (forward KL), the student's for ``β = 1``
    (reverse KL), their union in between."""
    if support != "auto":
        return support
    return "teacher" if beta == 0.0 else "student" if beta == 1.0 else "union"


@per_example_loss
def topk_generalized_jsd(
    student_logits: Array,
    teacher_logits: Array,
    *,
    k: int,
    beta: float = 0.5,
    support: Support = "auto",
    tail: Tail = "bucket",
    temperature: float = 1.0,
) -> Array:
    """Generalized JSD (forward KL at ``β = 0``, reverse KL at ``β = 1``) over a top-k support, per example.

    ``p_S = softmax(student_logits / T)``, ``p_T = softmax(teacher_logits / T)`` over the full vocabulary. The
    support ``K`` is the teacher's top-``k`` classes (``support="teacher"``), the student's (``"student"``) or
    their union (``"union"``, up to ``2k`` classes); ``"auto"`` picks as TRL does: teacher for ``β = 0``,
    student for ``β = 1``, union otherwise. The top-k is not differentiated (the support is a selection).
    Both distributions are reduced to ``K``:

    * ``tail="bucket"``: ``K`` plus one tail category holding the remaining mass, ``p̃ = (p_K, 1 − Σ_K p)``
      (here the exact sum over the classes outside ``K``, equal in value to TRL's
      ``log(−expm1(logsumexp(log p_K)))`` without its ``−1e-7`` clamp);
    * ``tail="drop"``: ``K`` alone, renormalized, ``p̃ = p_K / Σ_K p``.

    Then, with ``m = β·p̃_T + (1 − β)·p̃_S`` (``β`` weights the teacher, GKD's convention)::

        D_β = β·KL(p̃_T ‖ m) + (1 − β)·KL(p̃_S ‖ m)    for 0 < β < 1
        D_0 = KL(p̃_T ‖ p̃_S),   D_1 = KL(p̃_S ‖ p̃_T)

    With ``k = V`` (or a support covering every class) this is :func:`jaxkd.losses.generalized_jsd`. The
    tail-bucket form is a lower bound on the dense divergence (data processing inequality: merging classes).

    Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"
    (ICLR 2024) for ``D_β``; the top-k support and tail bucket follow TRL's
    ``trl/experimental/iw_opd/iw_opd_trainer.py`` (``generalized_jsd_loss(top_k=..., add_tail=...)``,
    ``_add_tail_bucket``, ``_jsd_divergence``); SDFT/SDPO's ``compute_topk_self_distillation_loss``
    (``trl/experimental/sdft/loss_utils.py``) is ``support="student"`` with ``β`` their ``distillation_alpha``. Conventions of :mod:`jaxkd.losses.logit.divergences`: float32,
    ``-inf`` logits are zero mass with zero gradients, a KL term ``p·log(p/0)`` is dropped (TRL's
    ``nan_to_num`` would make it ``3.4e38``).

    Args:
      student_logits, teacher_logits: ``[..., V]``, the same shape.
      k: ``1 <= k <= V``.
      beta: ``β`` in ``[0, 1]`` (TRL's default 0.5), a Python number (it selects the formula and the ``"auto"``
        support).
      support: ``"auto"``, ``"teacher"``, ``"student"`` or ``"union"``.
      tail: ``"bucket"`` (TRL's default ``add_tail=True``) or ``"drop"``.
      temperature: ``T > 0``, for both.
    """
    check_temperature("temperature", temperature)
    check_choice("support", support, SUPPORTS)
    check_choice("tail", tail, ("bucket", "drop"))
    check_same_logits(student_logits, teacher_logits)
    if not is_concrete(beta):
        raise ValueError("beta must be a concrete number for topk_generalized_jsd (it selects the formula and support)")
    check_in_range("beta", beta, 0.0, 1.0)
    beta = float(beta)
    vocab_size = jnp.shape(student_logits)[-1]
    k = check_int("k", k, low=1)
    if k > vocab_size:
        raise ValueError(f"k={k} is larger than the vocabulary ({vocab_size} classes); use k <= {vocab_size}")
    log_s = log_softmax(student_logits, temperature)
    log_t = log_softmax(teacher_logits, temperature)
    side = resolve_support(support, beta)
    # The selection reads the log-probabilities (the order of the logits; -inf classes come last).
    if side == "teacher":
        member = _topk_member(jax.lax.stop_gradient(log_t), k)
    elif side == "student":
        member = _topk_member(jax.lax.stop_gradient(log_s), k)
    else:
        member = _topk_member(jax.lax.stop_gradient(log_t), k) | _topk_member(jax.lax.stop_gradient(log_s), k)
    ks = jnp.where(member, log_s, -jnp.inf)
    kt = jnp.where(member, log_t, -jnp.inf)
    if tail == "drop":
        ks, kt = ks - _finite(masked_logsumexp(ks, keepdims=True)), kt - _finite(masked_logsumexp(kt, keepdims=True))
        return _gjsd(jnp.where(member, ks, -jnp.inf), jnp.where(member, kt, -jnp.inf), beta)
    tail_s = masked_logsumexp(log_s, ~member, keepdims=True)
    tail_t = masked_logsumexp(log_t, ~member, keepdims=True)
    # Every term is per category, so the k + 1 categories are the support's sum plus the tail's.
    return _gjsd(ks, kt, beta) + _gjsd(tail_s, tail_t, beta)
