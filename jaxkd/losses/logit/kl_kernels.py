"""KL and generalized JSD between two sets of logits with hand-written gradients (``jax.custom_vjp``).

The values and gradients of :func:`jaxkd.losses.forward_kl`, :func:`~jaxkd.losses.reverse_kl`,
:func:`~jaxkd.losses.generalized_jsd` and :func:`~jaxkd.losses.js_divergence` (same conventions for
``-inf``, NaN and ``+inf``: see :mod:`jaxkd.losses.logit.divergences`), computed so that no ``[..., C]``
array but the gradients themselves is ever written to memory.

Why: with a language model's vocabulary, ``[tokens, V]`` element-wise passes are what a distillation step
spends its time on outside the matrix products — on a CPU, writing a fresh ``[2048, 8192]`` float32 array
costs about as much as a ``2048 × 512 × 1344`` matmul. Autodiff of ``log_softmax`` and the masked KL writes
about ten such arrays (log-probabilities, probabilities, masks, their cotangents); XLA keeps them because
each has several consumers, and XLA:CPU does not fuse a compare or select into its row reductions. Here
the forward pass is row reductions only (max, Σ exp, the divergence) and the backward pass writes exactly
one array per differentiated input (none for a stop-gradient teacher), from closed forms (``x = logits /
T``, ``p = softmax(x_p)``, ``q = softmax(x_q)``, ``B`` the classes neither side excludes, ``KL = Σ_B p (log p
− log q)``, ``M = Σ_B p``)::

    KL(p ‖ q):   ∂/∂x_q,j = M·q_j − [j ∈ B]·p_j
                 ∂/∂x_p,j = [j ∈ B]·p_j·(log p_j − log q_j + 1) − p_j·(KL + M)

    JSD_β = β·KL(p_T ‖ m) + (1−β)·KL(p_S ‖ m),  m = β·p_T + (1−β)·p_S  (0 < β < 1):
                 ∂/∂x_S,j = (1−β)·p_S,j·(log p_S,j − log m_j − KL(p_S ‖ m))
                 ∂/∂x_T,j = β·p_T,j·(log p_T,j − log m_j − KL(p_T ‖ m))

(the second from ``∂JSD_β/∂p_S,c = (1−β)(log p_S,c − log m_c)``, the ``m`` terms cancelling, then the
softmax Jacobian), each divided by ``T``. These are the gradients of Liger-Kernel's fused JSD
(``linkedin/Liger-Kernel``, ``src/liger_kernel/ops/jsd.py``) and of TRL's ``generalized_jsd_loss``, with
jaxkd's exclusion conventions kept. ``tests/test_loss_contract.py`` and ``tests/test_kl_kernels.py`` check
them against float64 central differences, and against the autodiff of the formulas.

Each pass has two forms: *plain*, when no logit of the call is ``-inf`` (arithmetic only, ``M = 1``), and
*exact*, with the exclusion masks; one ``lax.cond`` per call picks it from two min-reductions.

Reverse mode only, at any order (the backward pass is plain ``jnp``, itself differentiable); ``jax.jvp``
is not defined for a ``custom_vjp``. The public losses use these kernels when the temperature (and
``β``) are Python numbers and fall back to the autodiff formulas when they are traced.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxkd.losses.core import Array

__all__ = ["cross_entropy_rows", "generalized_jsd_rows", "kl_rows"]

_NEG_INF = -jnp.inf


def _scaled(logits: Array, temperature: float) -> Array:
    """``logits / T`` in the losses' compute dtype (at least float32)."""
    dtype = jnp.promote_types(jnp.result_type(logits), jnp.float32)
    return logits.astype(dtype) / jnp.asarray(temperature, dtype)


def _lse(x: Array) -> Array:
    """``log Σ exp(x)`` over the last axis (keepdims), two row reductions: ``-inf`` entries contribute 0, an
    all-``-inf`` row gives ``-inf``, NaN gives NaN and a ``+inf`` entry NaN (the row is undefined, as
    :func:`jaxkd.losses.core.log_softmax` has it)."""
    shift = jnp.max(x, axis=-1, keepdims=True)
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    lse = jnp.log(jnp.sum(jnp.exp(x - shift), axis=-1, keepdims=True)) + shift
    return jnp.where(lse == jnp.inf, jnp.nan, lse)


def _log_probs(x: Array, lse: Array) -> tuple[Array, Array, Array]:
    """``(valid, log p, p)``: which classes are not ``-inf``, and the log-probabilities and probabilities with
    0 (never ``-inf`` or NaN from ``-inf − -inf``) where excluded, so every branch a ``where`` discards is
    finite and second-order gradients stay clean."""
    valid = x != _NEG_INF
    log_p = jnp.where(valid, x - jnp.where(valid, lse, 0.0), 0.0)
    return valid, log_p, jnp.where(valid, jnp.exp(log_p), 0.0)


# Two forms of every pass: *plain* when no logit of the batch is -inf (arithmetic only: XLA:CPU fuses it
# into its row reductions, where a compare or select makes it write the element-wise part out first) and
# *exact* with the exclusion masks. One lax.cond per call picks the form from two min-reductions, so the
# common case never pays for the masks and a batch with exclusions still gets the documented conventions.


def _any_excluded(*xs: Array) -> Array:
    """Whether the exact form is needed: any entry of the arrays is ``-inf``, or NaN (a NaN hides a ``-inf``
    from ``min``; such a batch is broken anyway, and the exact form keeps its other rows right)."""
    flags = [(m == _NEG_INF) | jnp.isnan(m) for m in (jnp.min(x) for x in xs if x.size)]
    return functools.reduce(jnp.logical_or, flags, jnp.asarray(False))


def _fresh(*xs: Array) -> tuple[Array, ...]:
    """The arrays behind an optimization barrier: the backward pass's recomputation from the inputs is then
    not merged with the forward pass's by common-subexpression elimination, which would give the shared
    ``[..., C]`` intermediates two consumers and make XLA write them to memory."""
    return jax.lax.optimization_barrier(xs)


# ----- KL(p ‖ q), the dropped-term convention -----


def _kl_exact_terms(xp, xq, lse_p, lse_q):
    valid_p, log_p, p = _log_probs(xp, lse_p)
    valid_q, log_q, q = _log_probs(xq, lse_q)
    return valid_p & valid_q, log_p, p, log_q, q


def _kl_value(xp, xq, lse_p, lse_q, excluded):
    def plain(_):
        log_p, log_q = xp - lse_p, xq - lse_q
        return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1), jnp.ones(xp.shape[:-1], xp.dtype)

    def exact(_):
        both, log_p, p, log_q, _q = _kl_exact_terms(xp, xq, lse_p, lse_q)
        kl = jnp.sum(jnp.where(both, p * (log_p - log_q), 0.0), axis=-1)
        return kl, jnp.sum(jnp.where(both, p, 0.0), axis=-1)

    return jax.lax.cond(excluded, exact, plain, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def kl_rows(p_logits: Array, q_logits: Array, temperature: float) -> Array:
    """``KL(softmax(p_logits / T) ‖ softmax(q_logits / T))`` over the last axis: ``[...]``, in at least
    float32. Terms a class excludes on either side (``-inf``) are dropped; ``temperature`` a Python number."""
    return _kl_fwd(p_logits, q_logits, temperature)[0]


def _kl_fwd(p_logits, q_logits, temperature):
    xp, xq = _scaled(p_logits, temperature), _scaled(q_logits, temperature)
    lse_p, lse_q = _lse(xp), _lse(xq)
    excluded = _any_excluded(xp, xq)
    kl, mass = _kl_value(xp, xq, lse_p, lse_q, excluded)
    return kl, (p_logits, q_logits, lse_p, lse_q, kl, mass, excluded)


def _kl_bwd(temperature, residuals, g):
    p_logits, q_logits, lse_p, lse_q, kl, mass, excluded = residuals
    p_logits, q_logits = _fresh(p_logits, q_logits)
    xp, xq = _scaled(p_logits, temperature), _scaled(q_logits, temperature)
    scale = (g / temperature)[..., None]
    kl, mass = kl[..., None], mass[..., None]

    def plain(_):  # M = 1: no class is excluded
        log_p, log_q = xp - lse_p, xq - lse_q
        p, q = jnp.exp(log_p), jnp.exp(log_q)
        return scale * (p * (log_p - log_q - kl)), scale * (q - p)

    def exact(_):
        both, log_p, p, log_q, q = _kl_exact_terms(xp, xq, lse_p, lse_q)
        d_p = scale * (jnp.where(both, p * (log_p - log_q + 1.0), 0.0) - p * (kl + mass))
        return d_p, scale * (mass * q - jnp.where(both, p, 0.0))

    d_p, d_q = jax.lax.cond(excluded, exact, plain, None)
    return d_p.astype(jnp.result_type(p_logits)), d_q.astype(jnp.result_type(q_logits))


kl_rows.defvjp(_kl_fwd, _kl_bwd)


# ----- generalized JSD, 0 < β < 1 -----


def _jsd_terms(xs, xt, lse_s, lse_t, beta, excluded):
    """``(log p_S, p_S, log p_T, p_T, log m)`` element-wise, 0 where a side excludes the class. ``log m =
    log(β·p_T + (1−β)·p_S) = hi + log1p(exp(lo − hi))`` over the two weighted log-probabilities; with
    ``excluded``, a class one side excludes has the other's term alone (``exp(−inf) = 0``) and one neither
    has is never read."""
    if not excluded:
        log_s, log_t = xs - lse_s, xt - lse_t
        # log β folded into the per-row offsets: a constant broadcast to [..., C] would be written out.
        a, b = xt - (lse_t - math.log(beta)), xs - (lse_s - math.log1p(-beta))
        hi = jnp.maximum(a, b)
        return log_s, jnp.exp(log_s), log_t, jnp.exp(log_t), hi + jnp.log1p(jnp.exp(jnp.minimum(a, b) - hi))
    valid_s, log_s, p_s = _log_probs(xs, lse_s)
    valid_t, log_t, p_t = _log_probs(xt, lse_t)
    a = jnp.where(valid_t, log_t + math.log(beta), _NEG_INF)
    b = jnp.where(valid_s, log_s + math.log1p(-beta), _NEG_INF)
    hi = jnp.where(valid_s | valid_t, jnp.maximum(a, b), 0.0)
    return log_s, p_s, log_t, p_t, hi + jnp.log1p(jnp.exp(jnp.minimum(a, b) - hi))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def generalized_jsd_rows(student_logits: Array, teacher_logits: Array, temperature: float, beta: float) -> Array:
    """``β·KL(p_T ‖ m) + (1−β)·KL(p_S ‖ m)``, ``m = β·p_T + (1−β)·p_S``, over the last axis, for a Python
    number ``0 < β < 1`` (the endpoints are :func:`kl_rows`); ``[...]`` in at least float32."""
    return _jsd_fwd(student_logits, teacher_logits, temperature, beta)[0]


def _jsd_fwd(student_logits, teacher_logits, temperature, beta):
    xs, xt = _scaled(student_logits, temperature), _scaled(teacher_logits, temperature)
    lse_s, lse_t = _lse(xs), _lse(xt)
    excluded = _any_excluded(xs, xt)

    def parts(excluded):
        def branch(_):
            # p·(log p − log m) is 0 wherever p is (excluded classes have log p = 0 here, never -inf). Each
            # sum recomputes log m from its own copy of the inputs: one shared log m would be written out.
            log_s, p_s, _, _, log_m = _jsd_terms(xs, xt, lse_s, lse_t, beta, excluded)
            kl_s = jnp.sum(p_s * (log_s - log_m), axis=-1)
            _, _, log_t, p_t, log_m = _jsd_terms(*_fresh(xs, xt, lse_s, lse_t), beta, excluded)
            return kl_s, jnp.sum(p_t * (log_t - log_m), axis=-1)
        return branch

    kl_s, kl_t = jax.lax.cond(excluded, parts(True), parts(False), None)
    value = beta * kl_t + (1.0 - beta) * kl_s
    return value, (student_logits, teacher_logits, lse_s, lse_t, kl_s, kl_t, excluded)


def _jsd_bwd(temperature, beta, residuals, g):
    student_logits, teacher_logits, lse_s, lse_t, kl_s, kl_t, excluded = residuals
    student_logits, teacher_logits = _fresh(student_logits, teacher_logits)
    xs, xt = _scaled(student_logits, temperature), _scaled(teacher_logits, temperature)
    scale = (g / temperature)[..., None]

    def grads(excluded):
        def branch(_):
            log_s, p_s, log_t, p_t, log_m = _jsd_terms(xs, xt, lse_s, lse_t, beta, excluded)
            return (scale * ((1.0 - beta) * p_s * (log_s - log_m - kl_s[..., None])),
                    scale * (beta * p_t * (log_t - log_m - kl_t[..., None])))
        return branch

    d_s, d_t = jax.lax.cond(excluded, grads(True), grads(False), None)
    return d_s.astype(jnp.result_type(student_logits)), d_t.astype(jnp.result_type(teacher_logits))


generalized_jsd_rows.defvjp(_jsd_fwd, _jsd_bwd)


# ----- label cross-entropy with smoothing -----


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def cross_entropy_rows(logits: Array, labels: Array, label_smoothing: float) -> Array:
    """``−Σ_c y_c log softmax(logits)_c``, ``y = (1 − ε)·onehot(label) + ε·u`` (``u`` uniform over the classes
    that are not ``-inf``), over the last axis: ``[...]`` in at least float32; NaN for a label outside
    ``[0, C)``, ``+inf`` for a label at a ``-inf`` class (with ``ε < 1``). ``label_smoothing`` a Python number.

    ``value = (1 − ε)(lse − x_label) + ε(lse − mean_kept(x))``; gradient ``S·softmax_j − y_j`` with ``S = Σ``
    of the target mass on classes that are not ``-inf`` (1 unless the label's class is one)."""
    return _ce_fwd(logits, labels, label_smoothing)[0]


def _ce_label_logit(x: Array, labels: Array) -> tuple[Array, Array]:
    num_classes = x.shape[-1]
    valid = (labels >= 0) & (labels < num_classes)
    picked = jnp.take_along_axis(x, jnp.clip(labels, 0, num_classes - 1)[..., None].astype(jnp.int32), axis=-1)
    return picked[..., 0], valid


def _ce_fwd(logits, labels, label_smoothing):
    x = _scaled(logits, 1.0)
    lse = _lse(x)[..., 0]
    x_label, valid = _ce_label_logit(x, labels)
    excluded = _any_excluded(x)
    eps = label_smoothing

    def smoothing(exact):
        def branch(_):
            if not exact:  # every class kept: u = 1/C
                return jnp.mean(x, axis=-1), jnp.asarray(x.shape[-1], x.dtype) * jnp.ones_like(lse)
            kept = x != _NEG_INF
            count = jnp.sum(kept, axis=-1).astype(x.dtype)
            return jnp.sum(jnp.where(kept, x, 0.0), axis=-1) / jnp.maximum(count, 1.0), count
        return branch

    if eps:
        mean_kept, count = jax.lax.cond(excluded, smoothing(True), smoothing(False), None)
    else:
        mean_kept, count = jnp.zeros_like(lse), jnp.ones_like(lse)
    # Each term only where its target mass is positive: a label at a -inf class gives +inf with ε < 1 and
    # is no term at all with ε = 1 (as 0·log 0 = 0).
    # A label at a -inf class: +inf (lse − x_label would be NaN for an all -inf row); no class kept: no ε term.
    label_term = jnp.where(x_label == _NEG_INF, jnp.inf, lse - x_label)
    smooth_term = jnp.where(count > 0, lse - mean_kept, 0.0)
    value = (eps * smooth_term if eps else 0.0) + ((1.0 - eps) * label_term if eps < 1 else 0.0)
    value = jnp.where(valid, value, jnp.nan)
    return value, (logits, labels, lse, count, excluded)


def _ce_bwd(label_smoothing, residuals, g):
    logits, labels, lse, count, excluded = residuals
    (logits,) = _fresh(logits)
    x = _scaled(logits, 1.0)
    eps = label_smoothing
    _, valid = _ce_label_logit(x, labels)
    scale = jnp.where(valid, g, 0.0)[..., None]
    one_hot = labels[..., None] == jnp.arange(x.shape[-1])

    def plain(_):
        return scale * (jnp.exp(x - lse[..., None]) - (1.0 - eps) * one_hot - eps / x.shape[-1])

    def exact(_):
        valid_x, _, p = _log_probs(x, lse[..., None])
        label_kept = jnp.any(one_hot & valid_x, axis=-1, keepdims=True).astype(x.dtype)
        mass = (1.0 - eps) * label_kept + eps  # target mass on classes that are not -inf
        target = jnp.where(valid_x, (1.0 - eps) * one_hot + eps / jnp.maximum(count[..., None], 1.0), 0.0)
        return scale * (mass * p - target)

    d = jax.lax.cond(excluded, exact, plain, None)
    return d.astype(jnp.result_type(logits)), None


cross_entropy_rows.defvjp(_ce_fwd, _ce_bwd)
