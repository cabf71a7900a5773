"""Logit standardization (Sun, Ren, Li, Wang & Cao, "Logit Standardization in Knowledge Distillation",
CVPR 2024)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd.checks import check_positive, check_same_logits, check_temperature
from jaxkd.losses.core import Array, is_masked, per_example_loss, safe_sqrt, to_float
from jaxkd.losses.logit.divergences import forward_kl

__all__ = ["kd_ls", "standardize_logits"]

# A row's spread below this many float ulps of its magnitude is rounding noise, not signal.
_NOISE_ULPS = 4.0


def standardize_logits(logits: Array, *, eps: float = 1e-7) -> Array:
    """Z-score logit standardization per row (Sun et al., "Logit Standardization in Knowledge
    Distillation", CVPR 2024).

    ``Z(z) = (z − mean(z)) / (eps + std(z))`` over the class axis, with the **unbiased** standard
    deviation (``ddof = 1``) and ``eps`` added to the std outside the square root — exactly the official
    ``normalize`` (``sunshangquan/logit-standardization-KD``, ``mdistiller/distillers/KD.py``; torch's
    ``std`` is unbiased by default).

    Excluded entries (``-inf``) stay ``-inf`` and stay out of the statistics; NaN propagates.

    Constant rows (a decision where the official code is ill-conditioned): a row whose standard deviation
    is at most ``4`` float ulps of its largest magnitude (``std ≤ 4·ε_mach·max|z|``, including ``std = 0``
    and a row with a single kept entry) is treated as constant and maps to all zeros — a uniform
    distribution after the softmax — with a zero gradient. Its spread is rounding noise, which the
    official formula would amplify into arbitrary ``O(1)`` logits (and a ``1/eps`` gradient), so that
    shifting such a row by a constant could change the loss completely. Rows with a real spread are
    standardized exactly as the official code does.
    """
    check_positive("eps", eps)
    z = to_float(logits)
    kept = ~is_masked(z)
    n = jnp.sum(kept, axis=-1, keepdims=True).astype(z.dtype)
    mean = jnp.sum(jnp.where(kept, z, 0.0), axis=-1, keepdims=True) / jnp.maximum(n, 1.0)
    dev = jnp.where(kept, z - mean, 0.0)
    std = safe_sqrt(jnp.sum(dev * dev, axis=-1, keepdims=True) / jnp.maximum(n - 1.0, 1.0))
    magnitude = jax.lax.stop_gradient(jnp.max(jnp.where(kept, jnp.abs(z), 0.0), axis=-1, keepdims=True))
    constant = std <= _NOISE_ULPS * jnp.finfo(z.dtype).eps * magnitude
    standardized = jnp.where(constant, 0.0, dev / (eps + jnp.where(constant, 1.0, std)))
    return jnp.where(kept, standardized, -jnp.inf)


@per_example_loss
def kd_ls(student_logits: Array, teacher_logits: Array, *, temperature: float = 2.0, eps: float = 1e-7) -> Array:
    """KD on standardized logits (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024).

    ``L = τ² · KL(softmax(Z(z_t)/τ) ‖ softmax(Z(z_s)/τ))`` per example, ``Z`` as in
    :func:`standardize_logits` and ``τ`` the "base temperature" (the effective per-sample temperature is
    ``τ·std(z)``). Variant: the official ``kd_loss`` with ``logit_stand=True`` — both sides standardized,
    ``τ²`` factor, batchmean; the repository's KD weight (9 on CIFAR-100) is the method's ``weight``.

    Standardization makes the loss invariant to shifting *and* (up to ``eps``) positively scaling either
    logit vector. Rows that are constant to float precision standardize to a uniform distribution
    (see :func:`standardize_logits`).
    """
    check_temperature("temperature", temperature)
    check_same_logits(student_logits, teacher_logits)
    zs, zt = standardize_logits(student_logits, eps=eps), standardize_logits(teacher_logits, eps=eps)
    return temperature**2 * forward_kl(zs, zt, temperature=temperature, reduction="none")
