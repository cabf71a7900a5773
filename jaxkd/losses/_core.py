"""Shared numerics for every loss: argument checks, float32 log-probabilities, masked reductions.

Conventions (the same in every loss of :mod:`jaxkd.losses`):

* Logits are ``[..., num_classes]``; everything is computed in float32 whatever the input dtype.
* ``-inf`` logits mark excluded vocabulary entries: they get probability 0, contribute 0 to every sum,
  and receive a zero (not NaN) gradient. A row whose logits are all ``-inf`` has all-zero probabilities.
* Per-example losses are reduced by :func:`reduce_loss`: the mean over examples whose ``mask`` is true
  (``weights`` for soft weights). When nothing is unmasked the loss is 0, never NaN.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Reduction = Literal["mean", "sum", "none"]


def is_concrete(x) -> bool:
    """True when ``x`` has a value now (not a tracer inside jit/grad), so it can be checked on the host."""
    return not isinstance(x, jax.core.Tracer)


def check_positive(name: str, value) -> None:
    if is_concrete(value) and not float(value) > 0:
        raise ValueError(f"{name} must be > 0, got {name}={value!r}")


def check_in_range(name: str, value, low: float, high: float) -> None:
    if is_concrete(value) and not low <= float(value) <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {name}={value!r}")


def check_same_logits(student_logits: Array, teacher_logits: Array) -> None:
    """Student and teacher logits must agree exactly in shape; a vocabulary mismatch gets its own message."""
    s, t = jnp.shape(student_logits), jnp.shape(teacher_logits)
    if len(s) == 0 or len(t) == 0:
        raise ValueError(f"logits must have a class axis, got shapes student={s} teacher={t}")
    if s[-1] != t[-1]:
        raise ValueError(
            f"student and teacher disagree on the number of classes (vocabulary): student has {s[-1]}, "
            f"teacher has {t[-1]} (shapes {s} and {t}); distill between models over the same classes"
        )
    if s != t:
        raise ValueError(f"student and teacher logits must have the same shape, got {s} and {t}")


def check_labels(labels: Array, logits: Array) -> None:
    """Integer labels of shape ``logits.shape[:-1]``; values in range when they are concrete."""
    num_classes = jnp.shape(logits)[-1]
    if jnp.shape(labels) != jnp.shape(logits)[:-1]:
        raise ValueError(
            f"labels must have shape logits.shape[:-1]={jnp.shape(logits)[:-1]}, got {jnp.shape(labels)}"
        )
    if not jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {jnp.asarray(labels).dtype}")
    if is_concrete(labels) and jnp.size(labels):
        # NumPy, not jnp: inside a trace jnp would stage even a constant's min as a tracer.
        values = np.asarray(labels)
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"label {bad} is outside [0, num_classes={num_classes})")


def log_softmax(logits: Array, temperature: float = 1.0) -> Array:
    """float32 ``log softmax(logits / T)`` that maps ``-inf`` to ``-inf`` and all-``-inf`` rows to ``-inf``.

    ``jax.nn.log_softmax`` returns NaN on a row with no finite entry; here such a row has zero mass.
    """
    x = jnp.asarray(logits, jnp.float32) / temperature
    finite = jnp.isfinite(x)
    shift = jax.lax.stop_gradient(
        jnp.max(jnp.where(finite, x, -jnp.inf), axis=-1, keepdims=True)
    )
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    total = jnp.sum(jnp.where(finite, jnp.exp(jnp.where(finite, x - shift, 0.0)), 0.0), -1, keepdims=True)
    log_total = jnp.log(jnp.where(total > 0, total, 1.0))
    return jnp.where(finite, x - shift - log_total, -jnp.inf)


def finite_or_zero(x: Array) -> Array:
    """Replaces ``±inf``/NaN by 0 with a zero gradient there, so ``p * log p`` terms at ``p = 0`` stay 0."""
    return jnp.where(jnp.isfinite(x), x, 0.0)


def reduce_loss(
    per_example: Array,
    *,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Reduces a per-example loss ``[...]`` to a scalar.

    ``"mean"``: ``Σ w·l / Σ w`` with ``w = mask * weights`` (0 when ``Σ w = 0``); ``"sum"``: ``Σ w·l``;
    ``"none"``: ``w·l`` unreduced (masked entries are 0).
    """
    per_example = jnp.asarray(per_example, jnp.float32)
    w = jnp.ones_like(per_example)
    if mask is not None:
        if jnp.shape(mask) != jnp.shape(per_example):
            raise ValueError(f"mask must have shape {jnp.shape(per_example)}, got {jnp.shape(mask)}")
        w = w * jnp.asarray(mask, jnp.float32)
    if weights is not None:
        if jnp.shape(weights) != jnp.shape(per_example):
            raise ValueError(f"weights must have shape {jnp.shape(per_example)}, got {jnp.shape(weights)}")
        w = w * jnp.asarray(weights, jnp.float32)
    # A masked-out example may hold garbage (inf from padding); never let it reach the sum.
    weighted = jnp.where(w != 0, per_example * w, 0.0)
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return jnp.sum(weighted)
    if reduction == "mean":
        denom = jnp.sum(w)
        return jnp.where(denom > 0, jnp.sum(weighted) / jnp.where(denom > 0, denom, 1.0), 0.0)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
