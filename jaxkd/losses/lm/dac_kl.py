"""DAC-KL and the span-level correlation loss of multi-granularity semantic revision (MGSR).

Liu, Zhang, Li, Li, Huang, Chen, Tang, Hu, Xiong & Wang, "Multi-Granularity Semantic Revision for Large
Language Model Distillation" (arXiv 2407.10068, 2024; ACL 2026). Its objective is
``L_SFT + L_DAC-KL + L_span`` (equal weights) on sequences from its sequence-level correction and
re-generation (SCRG, a generation procedure, not a loss; not here).

**What could be verified, and what is assumed.** No official code is published, and the paper's method
section (its Eq. 6 for DAC-KL, Eq. 10 for the span loss) could not be read: only the abstract, public
reviews of an earlier (conference) submission of the paper, and summaries. From those:

* DAC-KL: a learnable MLP sub-network ``f_sub`` predicts a lower and an upper quantile ``(l, u)`` that clip
  the teacher's output distribution to its "semantically dense" region before the KL; the paper ablates
  the learned bounds against a fixed clipping threshold. **Assumed here:** the region is the set of
  vocabulary entries whose teacher probability lies between the ``l``- and ``u``-quantiles of the
  teacher's probabilities over the vocabulary (``torch.quantile``'s linear interpolation), and the loss
  is the forward KL between teacher and student both renormalized on that region (the ``tail="drop"``
  convention of :func:`jaxkd.losses.sparse_forward_kl`). The bounds are *inputs* (a fixed pair, or a
  per-token array from a network the caller owns): the region is a hard selection, so the loss gives
  the bounds no gradient, and how the paper trains ``f_sub`` is not known. Treat :func:`dac_kl` as the
  fixed-threshold clipped KL, not a reproduction of the learned DAC-KL.
* Span loss: within linguistic spans (noun/verb/prepositional phrases from an external chunker), the
  "probability correlation" of adjacent tokens is the element-wise (Hadamard) product of their
  probability vectors, and the teacher's and the student's are constrained to agree. **Assumed here:**
  the squared Euclidean distance summed over the vocabulary, averaged over adjacent in-span pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_same_logits, check_values_in_range, is_concrete
from jaxkd.losses.core import Array, is_masked, kl_from_log_probs, log_softmax, per_example_loss, probs, reduce_loss
from jaxkd.losses.lm.tokens import check_sequence_logits

__all__ = ["dac_kl", "dac_kl_region", "span_correlation_loss"]


def _check_bounds(lower, upper, batch_shape) -> None:
    for name, value in (("lower", lower), ("upper", upper)):
        shape = jnp.shape(value)
        try:
            fits = np.broadcast_shapes(shape, tuple(batch_shape)) == tuple(batch_shape)
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"{name} must broadcast to logits.shape[:-1]={tuple(batch_shape)}, got shape {shape}")
        check_values_in_range(name, value, 0.0, 1.0)
    if is_concrete(lower) and is_concrete(upper) and np.any(np.asarray(lower) > np.asarray(upper)):
        raise ValueError("lower must be <= upper (the lower quantile of the clipped region is above the upper)")


def _quantile(values: Array, valid: Array, q: Array) -> Array:
    """The ``q``-quantile of each row's valid entries, linear interpolation between order statistics
    (``torch.quantile``/``numpy.quantile``'s default); ``q`` broadcasts to the rows."""
    n = jnp.sum(valid, axis=-1)
    ascending = jnp.sort(jnp.where(valid, values, jnp.inf), axis=-1)  # invalid entries sort last
    pos = jnp.asarray(q, values.dtype) * jnp.maximum(n - 1, 0).astype(values.dtype)
    lo = jnp.floor(pos)
    frac = pos - lo
    lo_i = lo.astype(jnp.int32)
    hi_i = jnp.minimum(lo_i + 1, jnp.maximum(n - 1, 0))
    a = jnp.take_along_axis(ascending, lo_i[..., None], axis=-1)[..., 0]
    b = jnp.take_along_axis(ascending, hi_i[..., None], axis=-1)[..., 0]
    return jnp.where(frac > 0, a + frac * (b - a), a)


def dac_kl_region(teacher_logits: Array, *, lower, upper) -> Array:
    """The clipped region (ASSUMPTION, see the module docstring): boolean ``[..., V]``, the entries ``v``
    with ``Q_lower ≤ p_T(v) ≤ Q_upper``, ``Q_α`` the ``α``-quantile of the teacher's probabilities over its
    non-excluded vocabulary. ``lower``/``upper`` in ``[0, 1]``, scalars or arrays broadcasting to
    ``teacher_logits.shape[:-1]``. ``(0, 1)`` keeps every entry; the region can be empty when both
    quantiles fall between the same two order statistics."""
    if jnp.ndim(teacher_logits) == 0:
        raise ValueError(f"teacher_logits must have a vocabulary axis, got shape {jnp.shape(teacher_logits)}")
    _check_bounds(lower, upper, jnp.shape(teacher_logits)[:-1])
    log_t = jax.lax.stop_gradient(log_softmax(teacher_logits))
    valid = ~is_masked(log_t)
    p = probs(log_t)
    batch_shape = p.shape[:-1]
    q_lo = _quantile(p, valid, jnp.broadcast_to(jnp.asarray(lower, p.dtype), batch_shape))
    q_hi = _quantile(p, valid, jnp.broadcast_to(jnp.asarray(upper, p.dtype), batch_shape))
    return valid & (p >= q_lo[..., None]) & (p <= q_hi[..., None])


def _restrict(log_p: Array, region: Array) -> Array:
    """``log_p`` restricted to ``region`` and renormalized there (all ``-inf`` when nothing is left)."""
    return log_softmax(jnp.where(region, log_p, -jnp.inf))


@per_example_loss
def dac_kl(student_logits: Array, teacher_logits: Array, *, lower, upper) -> Array:
    """Clipped forward KL (ASSUMED form of MGSR's DAC-KL; see the module docstring), per example.

    With ``S`` = :func:`dac_kl_region` (teacher probabilities between their ``lower`` and ``upper``
    quantiles over the vocabulary), ``p̃_T = p_T|_S / p_T(S)`` and ``p̃_S = p_S|_S / p_S(S)``:
    ``KL(p̃_T ‖ p̃_S)``. ``lower=0, upper=1`` is the forward KL. An empty region gives 0. Gradients reach
    both logits through the renormalized distributions; the region (and so ``lower``/``upper``) gets none.

    Args:
      student_logits, teacher_logits: ``[..., V]``.
      lower, upper: quantiles in ``[0, 1]``, ``lower <= upper``; scalars or per-example arrays (e.g. a
        sub-network's outputs per token).
    """
    check_same_logits(student_logits, teacher_logits)
    region = dac_kl_region(teacher_logits, lower=lower, upper=upper)
    return kl_from_log_probs(_restrict(log_softmax(teacher_logits), region), _restrict(log_softmax(student_logits), region))


def span_correlation_loss(
    student_logits: Array,
    teacher_logits: Array,
    span_ids: Array,
    mask: Array | None = None,
    *,
    reduction: str = "mean",
    normalizer: Array | float | None = None,
) -> Array:
    """MGSR's span-level correlation consistency (ASSUMED distance; see the module docstring).

    For adjacent positions ``t, t + 1`` of the same span (equal ``span_ids >= 0``, both unmasked), the
    correlation vectors ``c_t = p(·|t) ⊙ p(·|t + 1)`` of teacher and student are compared by
    ``Σ_v (c^T_t(v) − c^S_t(v))²``; the result is reduced over those pairs (the mean by default; 0 when
    there is none). ``reduction="none"`` gives ``[B, T − 1]`` per-pair values (0 where no pair).

    Args:
      student_logits, teacher_logits: ``[B, T, V]``.
      span_ids: int ``[B, T]``: the span of each position, ``-1`` outside every span.
      mask: bool ``[B, T]`` or ``None``.
    """
    check_sequence_logits(student_logits, teacher_logits, "span_ids", span_ids)
    if not jnp.issubdtype(jnp.result_type(span_ids), jnp.integer):
        raise ValueError(f"span_ids must be integers, got dtype {jnp.result_type(span_ids)}")
    if mask is not None and jnp.shape(mask) != jnp.shape(span_ids):
        raise ValueError(f"mask must have span_ids' shape {jnp.shape(span_ids)}, got {jnp.shape(mask)}")
    if jnp.shape(span_ids)[1] < 2:
        raise ValueError("span_correlation_loss needs sequences of at least 2 positions")
    ids = jnp.asarray(span_ids)
    m = jnp.ones(ids.shape, bool) if mask is None else jnp.asarray(mask, bool)
    pairs = (ids[:, :-1] == ids[:, 1:]) & (ids[:, :-1] >= 0) & m[:, :-1] & m[:, 1:]
    p_s, p_t = probs(log_softmax(student_logits)), probs(log_softmax(teacher_logits))
    c_s, c_t = p_s[:, :-1] * p_s[:, 1:], p_t[:, :-1] * p_t[:, 1:]
    per_pair = jnp.sum((c_t - c_s) ** 2, axis=-1)
    return reduce_loss(per_pair, mask=pairs, reduction=reduction, normalizer=normalizer)

