"""Divergences between the categorical distributions two sets of logits define.

Every function takes the **student first and the teacher second** (``f(student_logits, teacher_logits)``)
and is written once, per example, then reduced by :func:`jaxkd.losses.core.per_example_loss` (``mask``,
``weights``, ``reduction``; ``reduction="none"`` gives the per-example values). No ``T²`` factor is
applied anywhere in this module (as in TRL and DistiLLM); :func:`jaxkd.losses.kd` is the ``T²`` form.

Notation: ``p_T = softmax(teacher_logits / T)``, ``p_S = softmax(student_logits / T)``, ``KL(p‖q) =
Σ_c p_c (log p_c − log q_c)``.

Conventions shared by every divergence here (on top of :mod:`jaxkd.losses.core`):

* Everything is computed in (at least) float32 from log-probabilities; mixtures ``w·p + (1−w)·q`` are formed in log
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

import jax.numpy as jnp

from jaxkd.checks import check_in_range, check_number, check_same_logits, check_temperature, is_concrete
from jaxkd.losses.core import (
    Array,
    is_masked,
    kl_from_log_probs,
    log_mixture,
    log_softmax,
    per_example_loss,
    probs,
)
from jaxkd.losses.logit.kl_kernels import generalized_jsd_rows, kl_rows

__all__ = [
    "alpha_beta_divergence",
    "forward_kl",
    "generalized_jsd",
    "js_divergence",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "total_variation",
]


def _log_probs(student_logits: Array, teacher_logits: Array, temperature: float) -> tuple[Array, Array]:
    """Checked ``(log p_S, log p_T)`` at temperature ``T``."""
    check_temperature("temperature", temperature)
    check_same_logits(student_logits, teacher_logits)
    return log_softmax(student_logits, temperature), log_softmax(teacher_logits, temperature)


def _kernel_ready(student_logits: Array, teacher_logits: Array, temperature, *hyper) -> bool:
    """Checked, and whether the hand-differentiated kernels of :mod:`jaxkd.losses.logit.kl_kernels` apply:
    a concrete temperature (and hyper-parameters). A traced one takes the autodiff formulas below."""
    check_temperature("temperature", temperature)
    check_same_logits(student_logits, teacher_logits)
    return all(is_concrete(h) for h in (temperature, *hyper))


# ----- forward / reverse KL (student first) -----


@per_example_loss
def forward_kl(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0) -> Array:
    """Forward KL ``KL(p_T ‖ p_S) = Σ_c p_T,c (log p_T,c − log p_S,c)`` per example (mean-seeking).

    The divergence of Hinton et al., "Distilling the Knowledge in a Neural Network" (2015), here without
    the ``T²`` factor. Classes only the student masks (``-inf``) are dropped from the sum (see the module
    conventions).
    """
    if _kernel_ready(student_logits, teacher_logits, temperature):
        return kl_rows(teacher_logits, student_logits, float(temperature))
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    return kl_from_log_probs(log_t, log_s)


@per_example_loss
def reverse_kl(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0) -> Array:
    """Reverse KL ``KL(p_S ‖ p_T) = Σ_c p_S,c (log p_S,c − log p_T,c)`` per example (mode-seeking).

    The objective of Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models" (ICLR 2024) and
    GKD's ``β = 1`` endpoint (Agarwal et al., ICLR 2024), here as the exact token-level sum. Classes only the
    teacher masks (``-inf``) are dropped from the sum (the exact value would be ``+∞``), as in DistiLLM.
    """
    if _kernel_ready(student_logits, teacher_logits, temperature):
        return kl_rows(student_logits, teacher_logits, float(temperature))
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    return kl_from_log_probs(log_s, log_t)


# ----- Jensen–Shannon family -----


def _gjsd_mixture(log_s: Array, log_t: Array, beta) -> Array:
    """``β·KL(p_T‖m) + (1−β)·KL(p_S‖m)`` with ``m = β·p_T + (1−β)·p_S`` (no endpoint special-casing)."""
    log_m = log_mixture(log_t, log_s, beta)
    beta = jnp.asarray(beta, log_m.dtype)
    return beta * kl_from_log_probs(log_t, log_m) + (1.0 - beta) * kl_from_log_probs(log_s, log_m)


@per_example_loss
def js_divergence(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0) -> Array:
    """Jensen–Shannon divergence ``JS = ½ KL(p_T ‖ m) + ½ KL(p_S ‖ m)``, ``m = ½ (p_T + p_S)``, per example.

    Lin, "Divergence Measures Based on the Shannon Entropy" (IEEE Trans. Inf. Theory, 1991). Symmetric,
    bounded by ``log 2``; always finite, so classes masked on one side only count exactly.
    Equals :func:`generalized_jsd` at ``β = ½``.
    """
    if _kernel_ready(student_logits, teacher_logits, temperature):
        return generalized_jsd_rows(student_logits, teacher_logits, float(temperature), 0.5)
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    return _gjsd_mixture(log_s, log_t, 0.5)


@per_example_loss
def generalized_jsd(
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
    if _kernel_ready(student_logits, teacher_logits, temperature, beta):
        t, b = float(temperature), float(beta)
        if b == 0.0:
            return kl_rows(teacher_logits, student_logits, t)
        if b == 1.0:
            return kl_rows(student_logits, teacher_logits, t)
        return generalized_jsd_rows(student_logits, teacher_logits, t, b)
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    if is_concrete(beta):
        b = float(beta)
        if b == 0.0:
            return kl_from_log_probs(log_t, log_s)
        if b == 1.0:
            return kl_from_log_probs(log_s, log_t)
        return _gjsd_mixture(log_s, log_t, b)
    general = _gjsd_mixture(log_s, log_t, beta)
    return jnp.where(
        beta == 0.0,
        kl_from_log_probs(log_t, log_s),
        jnp.where(beta == 1.0, kl_from_log_probs(log_s, log_t), general),
    )


# ----- DistiLLM skew KL -----


def _skew_kl(
    student_logits: Array, teacher_logits: Array, temperature: float, alpha: float, *, reverse: bool
) -> Array:
    """``KL(p ‖ α·p + (1 − α)·q)`` with ``(p, q) = (p_T, p_S)`` (skew KL), or ``(p_S, p_T)`` when ``reverse``."""
    check_in_range("alpha", alpha, 0.0, 1.0)
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    log_p, log_q = (log_s, log_t) if reverse else (log_t, log_s)
    return kl_from_log_probs(log_p, log_mixture(log_p, log_q, alpha))


@per_example_loss
def skew_kl(
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
    return _skew_kl(student_logits, teacher_logits, temperature, alpha, reverse=False)


@per_example_loss
def skew_reverse_kl(
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
    return _skew_kl(student_logits, teacher_logits, temperature, alpha, reverse=True)


# ----- total variation -----


@per_example_loss
def total_variation(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0) -> Array:
    """Total variation distance ``TV = ½ Σ_c |p_T,c − p_S,c|`` per example, in ``[0, 1]``.

    Temperature convention: both distributions are ``softmax(logits / T)`` (default ``T = 1``, the
    DistiLLM ``tv_distance`` setting; Wen et al., "f-Divergence Minimization for Sequence-Level
    Knowledge Distillation", ACL 2023, use TVD as one of the f-divergences). No ``T²``. A class masked
    on one side contributes ``½·p`` of the other side; masked on both, nothing.
    """
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    return 0.5 * jnp.sum(jnp.abs(probs(log_t) - probs(log_s)), axis=-1)


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


@per_example_loss
def alpha_beta_divergence(
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
        check_number(name, value)
    alpha, beta = float(alpha), float(beta)
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    fp, fq = ~is_masked(log_t), ~is_masked(log_s)
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


