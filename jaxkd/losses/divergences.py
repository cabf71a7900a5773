"""Divergences between the categorical distributions two sets of logits define.

Every function takes the **student first and the teacher second** (``f(student_logits, teacher_logits)``),
except the older :func:`kl_per_example` / :func:`kl_divergence`, which take the *target* first. Each
divergence ``<name>`` comes as ``<name>_per_example(...) -> [...]`` and as a reduced ``<name>(...,
mask=None, weights=None, reduction="mean")`` (see :func:`jaxkd.losses.reduce_loss`). No ``T²`` factor is
applied anywhere in this module (as in TRL and DistiLLM); :func:`jaxkd.losses.kd` is the ``T²`` form.

Notation: ``p_T = softmax(teacher_logits / T)``, ``p_S = softmax(student_logits / T)``, ``KL(p‖q) =
Σ_c p_c (log p_c − log q_c)``.

Conventions shared by every divergence here (on top of :mod:`jaxkd.losses._core`):

* Everything is computed in float32 from log-probabilities; mixtures ``w·p + (1−w)·q`` are formed in log
  space (a log-sum-exp that maps ``-inf`` to ``-inf`` with zero, never NaN, gradients).
* A ``-inf`` logit is an excluded vocabulary entry: it has probability exactly 0 and receives a zero
  gradient. Divergences are then computed *exactly* with zero-mass entries (``0·log(0/q) = 0``), so an
  entry masked in both distributions contributes nothing — the value is the divergence over the remaining
  entries. The one exception is a term that would be ``+∞`` (``p_c·log(p_c/0)`` in a KL with
  ``p_c > 0 = q_c``, e.g. forward KL where only the student excludes a class the teacher supports, or
  reverse KL where only the teacher excludes one): that term is **dropped** (contributes 0), the
  convention DistiLLM uses for masked vocabulary, so the loss stays finite. Mixture divergences
  (JS, generalized JSD with ``0 < β < 1``, skew KL with ``α > 0``) and total variation never have such a
  term: a class one side excludes still counts with its exact (finite) contribution.
* A row whose logits are all ``-inf`` is a zero distribution; every divergence between two such rows is 0.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxkd.losses._core import (
    Array,
    Reduction,
    check_in_range,
    check_positive,
    check_same_logits,
    is_concrete,
    log_softmax,
    reduce_loss,
)

# ----- shared helpers -----


def _log_probs(student_logits: Array, teacher_logits: Array, temperature: float) -> tuple[Array, Array]:
    """Checked float32 ``(log p_S, log p_T)`` at temperature ``T``."""
    check_positive("temperature", temperature)
    check_same_logits(student_logits, teacher_logits)
    return log_softmax(student_logits, temperature), log_softmax(teacher_logits, temperature)


def _kl_from_log_probs(log_p: Array, log_q: Array) -> Array:
    """``Σ_c p_c (log p_c − log q_c)`` over the last axis, summing only entries with ``p_c > 0`` and ``q_c > 0``.

    ``p_c = 0`` terms are 0 by ``0·log 0 = 0``; ``q_c = 0 < p_c`` terms (``+∞``) are dropped. Both are
    masked before any arithmetic, so ``-inf`` inputs get zero gradients.
    """
    valid = jnp.isfinite(log_p) & jnp.isfinite(log_q)
    lp = jnp.where(valid, log_p, 0.0)
    lq = jnp.where(valid, log_q, 0.0)
    return jnp.sum(jnp.where(valid, jnp.exp(lp) * (lp - lq), 0.0), axis=-1)


def _log_mixture(log_a: Array, log_b: Array, w) -> Array:
    """``log(w·a + (1 − w)·b)`` elementwise from ``log a``, ``log b``; ``w`` in ``[0, 1]``.

    ``-inf`` inputs (zero mass) and ``w ∈ {0, 1}`` are exact; the result is ``-inf`` only where both
    weighted terms vanish, and no input ever gets a NaN gradient (unlike ``jnp.logaddexp``).
    """
    w = jnp.asarray(w, jnp.float32)
    la = log_a + jnp.log(w)
    lb = log_b + jnp.log1p(-w)
    fa, fb = jnp.isfinite(la), jnp.isfinite(lb)
    hi = jax.lax.stop_gradient(jnp.maximum(jnp.where(fa, la, -jnp.inf), jnp.where(fb, lb, -jnp.inf)))
    any_mass = jnp.isfinite(hi)
    hi = jnp.where(any_mass, hi, 0.0)
    total = jnp.where(fa, jnp.exp(jnp.where(fa, la - hi, 0.0)), 0.0) + jnp.where(
        fb, jnp.exp(jnp.where(fb, lb - hi, 0.0)), 0.0
    )
    return jnp.where(any_mass, hi + jnp.log(jnp.where(any_mass, total, 1.0)), -jnp.inf)


def _reduced(per_example: Array, mask, weights, reduction) -> Array:
    return reduce_loss(per_example, mask=mask, weights=weights, reduction=reduction)


# ----- KL (target-first, kept for backward compatibility) -----


def kl_per_example(target_logits: Array, logits: Array, *, temperature: float = 1.0) -> Array:
    """``KL(p ‖ q) = Σ_c p_c (log p_c − log q_c)`` per example, ``p = softmax(target/T)``,
    ``q = softmax(logits/T)``.

    Note the argument order: the *target* comes first (see :func:`forward_kl` for the student-first form).
    Entries with ``p_c = 0`` (a ``-inf`` target logit) contribute 0 (convention ``0·log 0 = 0``); entries
    where only ``q`` is masked (``-inf``) are dropped from the sum rather than making the loss infinite —
    the convention DistiLLM uses for masked vocabulary. Returns float32 ``[...]``.
    """
    check_positive("temperature", temperature)
    check_same_logits(logits, target_logits)
    return _kl_from_log_probs(log_softmax(target_logits, temperature), log_softmax(logits, temperature))


def kl_divergence(
    target_logits: Array,
    logits: Array,
    *,
    temperature: float = 1.0,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Forward KL ``KL(softmax(target/T) ‖ softmax(logits/T))`` reduced over examples (target first).

    The gradient flows into both arguments; wrap the target in ``jax.lax.stop_gradient`` to detach it.
    See :func:`kl_per_example` for the masking conventions and :func:`jaxkd.losses.reduce_loss` for the
    reduction (mean over unmasked examples by default).
    """
    per_example = kl_per_example(target_logits, logits, temperature=temperature)
    return reduce_loss(per_example, mask=mask, weights=weights, reduction=reduction)


# ----- forward / reverse KL (student first) -----


def forward_kl_per_example(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0) -> Array:
    """Forward KL ``KL(p_T ‖ p_S) = Σ_c p_T,c (log p_T,c − log p_S,c)`` per example (mean-seeking).

    The divergence of Hinton et al., "Distilling the Knowledge in a Neural Network" (2015), here without
    the ``T²`` factor; identical to ``kl_per_example(teacher_logits, student_logits)``. Classes only the
    student masks (``-inf``) are dropped from the sum (see the module conventions).
    """
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    return _kl_from_log_probs(log_t, log_s)


def forward_kl(
    student_logits: Array,
    teacher_logits: Array,
    *,
    temperature: float = 1.0,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Forward KL ``KL(p_T ‖ p_S)`` reduced over examples (no ``T²``). See :func:`forward_kl_per_example`."""
    per_example = forward_kl_per_example(student_logits, teacher_logits, temperature=temperature)
    return _reduced(per_example, mask, weights, reduction)


def reverse_kl_per_example(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0) -> Array:
    """Reverse KL ``KL(p_S ‖ p_T) = Σ_c p_S,c (log p_S,c − log p_T,c)`` per example (mode-seeking).

    The objective of Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models" (ICLR 2024) and
    GKD's ``β = 1`` endpoint (Agarwal et al., ICLR 2024), here as the exact token-level sum. Classes only the
    teacher masks (``-inf``) are dropped from the sum (the exact value would be ``+∞``), as in DistiLLM.
    """
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    return _kl_from_log_probs(log_s, log_t)


def reverse_kl(
    student_logits: Array,
    teacher_logits: Array,
    *,
    temperature: float = 1.0,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Reverse KL ``KL(p_S ‖ p_T)`` reduced over examples (no ``T²``). See :func:`reverse_kl_per_example`."""
    per_example = reverse_kl_per_example(student_logits, teacher_logits, temperature=temperature)
    return _reduced(per_example, mask, weights, reduction)


# ----- Jensen–Shannon family -----


def _gjsd_mixture(log_s: Array, log_t: Array, beta) -> Array:
    """``β·KL(p_T‖m) + (1−β)·KL(p_S‖m)`` with ``m = β·p_T + (1−β)·p_S`` (no endpoint special-casing)."""
    log_m = _log_mixture(log_t, log_s, beta)
    beta = jnp.asarray(beta, jnp.float32)
    return beta * _kl_from_log_probs(log_t, log_m) + (1.0 - beta) * _kl_from_log_probs(log_s, log_m)


def js_divergence_per_example(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0) -> Array:
    """Jensen–Shannon divergence ``JS = ½ KL(p_T ‖ m) + ½ KL(p_S ‖ m)``, ``m = ½ (p_T + p_S)``, per example.

    Lin, "Divergence Measures Based on the Shannon Entropy" (IEEE Trans. Inf. Theory, 1991). Symmetric,
    bounded by ``log 2``; always finite, so classes masked on one side only count exactly.
    Equals :func:`generalized_jsd_per_example` at ``β = ½``.
    """
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    return _gjsd_mixture(log_s, log_t, 0.5)


def js_divergence(
    student_logits: Array,
    teacher_logits: Array,
    *,
    temperature: float = 1.0,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Jensen–Shannon divergence reduced over examples. See :func:`js_divergence_per_example`."""
    per_example = js_divergence_per_example(student_logits, teacher_logits, temperature=temperature)
    return _reduced(per_example, mask, weights, reduction)


def generalized_jsd_per_example(
    student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0, beta: float = 0.5
) -> Array:
    """Generalized Jensen–Shannon divergence of GKD, in TRL's convention, per example.

    Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"
    (ICLR 2024), Eq. 1 with ``P = teacher``, ``Q = student``; TRL ``GKDTrainer.generalized_jsd_loss``
    (after the swapped-β fix, PR #3043)::

        m      = β·p_T + (1 − β)·p_S                      (β weights the TEACHER)
        JSD_β  = β·KL(p_T ‖ m) + (1 − β)·KL(p_S ‖ m)       for 0 < β < 1
        JSD_0  = KL(p_T ‖ p_S)   (forward KL)
        JSD_1  = KL(p_S ‖ p_T)   (reverse KL)

    The endpoints are special-cased as TRL does because the general formula vanishes there. They are
    the *normalized* limits: ``JSD_β / β → KL(p_T ‖ p_S)`` as ``β → 0`` (the second term is
    ``O(β²)``: ``(1−β)KL(p_S‖m) ≈ β²/2·χ²(p_T‖p_S)``) and ``JSD_β / (1−β) → KL(p_S ‖ p_T)`` as ``β → 1``.
    So the value jumps at the endpoints (``JSD_β → 0`` but ``JSD_0 = KL``), which is TRL's behaviour.

    Args:
      beta: ``β`` in ``[0, 1]``. A traced ``β`` (inside ``jit``) selects the endpoint forms with
        ``jnp.where``; a Python number picks one branch.
    """
    check_in_range("beta", beta, 0.0, 1.0)
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    if is_concrete(beta):
        b = float(beta)
        if b == 0.0:
            return _kl_from_log_probs(log_t, log_s)
        if b == 1.0:
            return _kl_from_log_probs(log_s, log_t)
        return _gjsd_mixture(log_s, log_t, b)
    general = _gjsd_mixture(log_s, log_t, beta)
    return jnp.where(
        beta == 0.0,
        _kl_from_log_probs(log_t, log_s),
        jnp.where(beta == 1.0, _kl_from_log_probs(log_s, log_t), general),
    )


def generalized_jsd(
    student_logits: Array,
    teacher_logits: Array,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """GKD's generalized JSD (TRL convention, no ``T²``) reduced over examples.

    See :func:`generalized_jsd_per_example`.
    """
    per_example = generalized_jsd_per_example(student_logits, teacher_logits, temperature=temperature, beta=beta)
    return _reduced(per_example, mask, weights, reduction)


# ----- DistiLLM skew KL -----


def skew_kl_per_example(
    student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0, alpha: float = 0.1
) -> Array:
    """Skew forward KL ``SKL_α = KL(p_T ‖ α·p_T + (1 − α)·p_S)`` per example.

    Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models" (ICML 2024);
    ``skewed_forward_kl`` in ``jongwooko/distillm`` (default ``α = 0.1``). DistiLLM computes the
    cross-entropy ``−Σ p_T log m``, which differs from this KL form by the teacher entropy ``H(p_T)``:
    the gradients with respect to the student are identical. The gradient flows through the mixture ``m``.
    ``α = 0`` is forward KL, ``α = 1`` gives 0. DistiLLM zeroes every class where either logit is
    ``±inf``; here a class only the student masks still counts exactly (``m > 0`` there when ``α > 0``).

    Args:
      alpha: ``α`` in ``[0, 1]``.
    """
    check_in_range("alpha", alpha, 0.0, 1.0)
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    return _kl_from_log_probs(log_t, _log_mixture(log_t, log_s, alpha))


def skew_kl(
    student_logits: Array,
    teacher_logits: Array,
    *,
    temperature: float = 1.0,
    alpha: float = 0.1,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """DistiLLM skew forward KL reduced over examples (no ``T²``). See :func:`skew_kl_per_example`."""
    per_example = skew_kl_per_example(student_logits, teacher_logits, temperature=temperature, alpha=alpha)
    return _reduced(per_example, mask, weights, reduction)


def skew_reverse_kl_per_example(
    student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0, alpha: float = 0.1
) -> Array:
    """Skew reverse KL ``SRKL_α = KL(p_S ‖ (1 − α)·p_T + α·p_S)`` per example.

    Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models" (ICML 2024);
    ``skewed_reverse_kl`` in ``jongwooko/distillm`` (a true KL there too). ``α`` weights the *student*
    inside the mixture; ``α = 0`` is reverse KL, ``α = 1`` gives 0. The gradient flows through both
    ``p_S`` and ``m``. With ``α > 0`` a class only the teacher masks still counts exactly.

    Args:
      alpha: ``α`` in ``[0, 1]``.
    """
    check_in_range("alpha", alpha, 0.0, 1.0)
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    return _kl_from_log_probs(log_s, _log_mixture(log_s, log_t, alpha))


def skew_reverse_kl(
    student_logits: Array,
    teacher_logits: Array,
    *,
    temperature: float = 1.0,
    alpha: float = 0.1,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """DistiLLM skew reverse KL reduced over examples (no ``T²``). See :func:`skew_reverse_kl_per_example`."""
    per_example = skew_reverse_kl_per_example(student_logits, teacher_logits, temperature=temperature, alpha=alpha)
    return _reduced(per_example, mask, weights, reduction)


# ----- total variation -----


def total_variation_per_example(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0) -> Array:
    """Total variation distance ``TV = ½ Σ_c |p_T,c − p_S,c|`` per example, in ``[0, 1]``.

    Temperature convention: both distributions are ``softmax(logits / T)`` (default ``T = 1``, the
    DistiLLM ``tv_distance`` setting; Wen et al., "f-Divergence Minimization for Sequence-Level
    Knowledge Distillation", ACL 2023, use TVD as one of the f-divergences). No ``T²``. A class masked
    on one side contributes ``½·p`` of the other side; masked on both, nothing.
    """
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    p_s = jnp.where(jnp.isfinite(log_s), jnp.exp(jnp.where(jnp.isfinite(log_s), log_s, 0.0)), 0.0)
    p_t = jnp.where(jnp.isfinite(log_t), jnp.exp(jnp.where(jnp.isfinite(log_t), log_t, 0.0)), 0.0)
    return 0.5 * jnp.sum(jnp.abs(p_t - p_s), axis=-1)


def total_variation(
    student_logits: Array,
    teacher_logits: Array,
    *,
    temperature: float = 1.0,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Total variation distance reduced over examples. See :func:`total_variation_per_example`."""
    per_example = total_variation_per_example(student_logits, teacher_logits, temperature=temperature)
    return _reduced(per_example, mask, weights, reduction)


# ----- alpha-beta divergence -----


def _exp_diff(v: Array, d: Array) -> Array:
    """``e^(v + d) − e^v`` for finite ``v, d``, as ``e^v·expm1(d)`` when ``|d| < 1`` (no cancellation).

    ``d`` is passed separately (not as a difference of two rounded exponents) so that a small ``d``
    keeps its relative precision.
    """
    close = jnp.abs(d) < 1.0
    return jnp.where(close, jnp.exp(v) * jnp.expm1(jnp.where(close, d, 0.0)), jnp.exp(v + d) - jnp.exp(v))


def _ab_general(a: Array, b: Array, alpha: float, beta: float) -> Array:
    """The ``α, β, α+β ≠ 0`` AB term for finite ``a = log p``, ``b = log q``, rearranged as

    ``−(p^α q^β − p^s)/(αβ) − (p^s − q^s)/(α s)``, ``s = α + β``, with ``|β| ≤ |α|`` (so that ``β → 0`` and
    ``s → 0`` stay well conditioned; the caller swaps the roles of ``p, q`` otherwise).
    """
    s = alpha + beta
    return -_exp_diff(s * a, beta * (b - a)) / (alpha * beta) - _exp_diff(s * b, s * (a - b)) / (alpha * s)


def _ab_terms(a: Array, b: Array, alpha: float, beta: float) -> Array:
    """Elementwise AB-divergence terms for finite log-probabilities ``a`` (P) and ``b`` (Q)."""
    s = alpha + beta
    if alpha == 0.0 and beta == 0.0:
        return 0.5 * (a - b) ** 2
    if s == 0.0:
        x = alpha * (a - b)  # term = (expm1(x) − x) / α², with a series near 0
        small = jnp.abs(x) < 0.1
        xs = jnp.where(small, x, 0.0)
        series = xs**2 / 2 + xs**3 / 6 + xs**4 / 24 + xs**5 / 120
        return jnp.where(small, series, jnp.expm1(jnp.where(small, 0.0, x)) - x) / alpha**2
    if beta == 0.0:
        return jnp.exp(alpha * a) * (a - b) / alpha - _exp_diff(alpha * b, alpha * (a - b)) / alpha**2
    if alpha == 0.0:
        return jnp.exp(beta * b) * (b - a) / beta - _exp_diff(beta * a, beta * (b - a)) / beta**2
    if abs(beta) <= abs(alpha):
        return _ab_general(a, b, alpha, beta)
    return _ab_general(b, a, beta, alpha)


def _ab_zero_p_term(b: Array, alpha: float, beta: float):
    """The exact term where ``p = 0 < q`` (``b = log q``), or ``None`` when it is ``+∞`` (then dropped)."""
    s = alpha + beta
    if alpha > 0 and beta != 0 and s > 0:
        return jnp.exp(s * b) / (alpha * s)
    if alpha > 0 and beta == 0:
        return jnp.exp(alpha * b) / alpha**2
    return None


def alpha_beta_divergence_per_example(
    student_logits: Array,
    teacher_logits: Array,
    *,
    temperature: float = 1.0,
    alpha: float,
    beta: float,
) -> Array:
    """Alpha-Beta divergence ``D_AB^(α,β)(P ‖ Q)`` with ``P = p_T`` (teacher), ``Q = p_S`` (student), per example.

    Cichocki, Cruces & Amari, "Generalized Alpha-Beta Divergences and Their Application to Robust
    Nonnegative Matrix Factorization" (Entropy, 2011), summed over classes, with the limiting cases as the
    continuous extensions of the general formula (each tested against that limit numerically)::

        α, β, α+β ≠ 0:  −1/(αβ) Σ (p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β))
        α ≠ 0, β = 0:   1/α² Σ (p^α log(p^α/q^α) − p^α + q^α)      (α = 1: KL(P‖Q))
        α = 0, β ≠ 0:   1/β² Σ (q^β log(q^β/p^β) − q^β + p^β)      (β = 1: KL(Q‖P))
        α = −β ≠ 0:     1/α² Σ (log(q^α/p^α) + (q^α/p^α)^(−1) − 1)
        α = β = 0:      ½ Σ (log p − log q)²

    (``α = β = 1`` is ``½‖P − Q‖²``; ``α = β = ½`` is ``2·Σ(√p − √q)²``.) Non-negative, zero iff
    ``P = Q``. The general case is evaluated in a rearranged form with ``expm1`` so values near the
    limiting cases (e.g. ``β = 10⁻⁴``) stay accurate in float32 — except next to ``α = β = 0``, where
    cancellation costs about ``10⁻⁷/|α|`` relative accuracy (pass exactly ``α = β = 0`` for that case).

    Zero-probability (``-inf``) classes: masked on both sides they contribute 0; masked on one side, the
    exact term is used where it is finite (e.g. ``p = 0`` with ``α > 0, α+β > 0`` gives ``q^(α+β)/(α(α+β))``)
    and dropped where it is ``+∞`` (e.g. any log-form case). With ``α < 0`` or ``β < 0`` the divergence is
    unbounded as probabilities approach 0 and may overflow float32.

    Args:
      alpha, beta: finite Python numbers (they select the formula, so they cannot be traced).
    """
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not is_concrete(value):
            raise ValueError(f"{name} must be a concrete number for alpha_beta_divergence (it selects the formula)")
        if not math.isfinite(float(value)):
            raise ValueError(f"{name} must be a finite number, got {name}={value!r}")
    alpha, beta = float(alpha), float(beta)
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    fp, fq = jnp.isfinite(log_t), jnp.isfinite(log_s)
    a = jnp.where(fp, log_t, 0.0)
    b = jnp.where(fq, log_s, 0.0)
    both = fp & fq
    terms = jnp.where(both, _ab_terms(a, b, alpha, beta), 0.0)
    zero_p = _ab_zero_p_term(b, alpha, beta)  # p = 0 < q
    if zero_p is not None:
        terms = terms + jnp.where(~fp & fq, zero_p, 0.0)
    zero_q = _ab_zero_p_term(a, beta, alpha)  # q = 0 < p: the same with roles swapped
    if zero_q is not None:
        terms = terms + jnp.where(fp & ~fq, zero_q, 0.0)
    return jnp.sum(terms, axis=-1)


def alpha_beta_divergence(
    student_logits: Array,
    teacher_logits: Array,
    *,
    temperature: float = 1.0,
    alpha: float,
    beta: float,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """AB-divergence ``D_AB^(α,β)(p_T ‖ p_S)`` reduced over examples.

    See :func:`alpha_beta_divergence_per_example`.
    """
    per_example = alpha_beta_divergence_per_example(
        student_logits, teacher_logits, temperature=temperature, alpha=alpha, beta=beta
    )
    return _reduced(per_example, mask, weights, reduction)
