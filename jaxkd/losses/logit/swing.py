"""Swing distillation (Li, Wu, Dong, Wu, Bian & Xiong, "Swing Distillation: A Privacy-Preserving
Knowledge Distillation Framework", 2022): KD with per-example temperatures and noisy soft targets."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from jaxkd.checks import (
    check_choice,
    check_nonnegative,
    check_same_logits,
    check_temperature,
    check_values_in_range,
)
from jaxkd.losses.core import Array, is_masked, kl_from_log_probs, log_softmax, per_example_loss, to_float

__all__ = ["swing"]


@per_example_loss
def swing(
    student_logits: Array,
    teacher_logits: Array,
    rng: Array,
    *,
    base_temperature: float = 2.0,
    max_temperature: float | None = None,
    privacy_scores: Array | None = None,
    noise_scale: float = 0.0,
    noise: Literal["gaussian", "laplace"] = "gaussian",
) -> Array:
    """Swing distillation (Li, Wu, Dong, Wu, Bian & Xiong, "Swing Distillation: A Privacy-Preserving
    Knowledge Distillation Framework", 2022, arXiv 2212.08349): KD with a per-example (per-token)
    temperature and noisy teacher soft targets.

    From the paper's text (abstract): the temperature is set per token, adaptively, from the likelihood
    that the token carries private information; noise is injected into the soft targets given to the
    student. The method section could not be read and no official code is known. **The following are
    assumptions:**

    * the privacy likelihood is an input, ``privacy_scores ∈ [0, 1]`` per example (from a private-entity
      detector the user runs; the paper's detector is not reproduced), and it maps *linearly* to the
      temperature ``T_i = base + (max − base) · r_i`` (``max_temperature`` defaults to ``base``: constant);
      a higher temperature flattens the teacher's targets on likely-private tokens;
    * the noise is added to the tempered teacher logits, ``q_i = softmax(z_t,i/T_i + σ·ξ_i)``, with
      ``ξ ~ N(0, I)`` (``noise="gaussian"``) or Laplace(0, 1) (``noise="laplace"``, scale ``σ``), drawn
      independently per example and class from ``rng`` — adding it in log space keeps ``q`` a distribution;
      excluded (``-inf``) classes get no noise and stay at zero mass. No privacy accounting is done;
    * ``L = T_i² · KL(q_i ‖ softmax(z_s,i/T_i))`` per example.

    With ``noise_scale = 0`` and a constant temperature this is exactly :func:`jaxkd.losses.kd`. All
    randomness comes from ``rng`` (a fixed key gives a fixed value).

    Args:
      student_logits, teacher_logits: ``[..., C]``.
      rng: PRNG key of the noise.
      base_temperature, max_temperature: temperatures in :data:`jaxkd.checks.TEMPERATURE_RANGE`.
      privacy_scores: ``[...]`` in ``[0, 1]``, or ``None``.
      noise_scale: ``σ ≥ 0``; ``noise``: ``"gaussian"`` or ``"laplace"``.
    """
    check_temperature("base_temperature", base_temperature)
    if max_temperature is None:
        max_temperature = base_temperature
    check_temperature("max_temperature", max_temperature)
    check_nonnegative("noise_scale", noise_scale)
    check_choice("noise", noise, ("gaussian", "laplace"))
    check_same_logits(student_logits, teacher_logits)
    zs, zt = to_float(student_logits), to_float(teacher_logits)
    shape = zs.shape
    if privacy_scores is None:
        temperature = jnp.full(shape[:-1], base_temperature, zs.dtype)
    else:
        if jnp.shape(privacy_scores) != shape[:-1]:
            raise ValueError(
                f"privacy_scores must have the examples' shape logits.shape[:-1]={shape[:-1]}, "
                f"got {jnp.shape(privacy_scores)}"
            )
        check_values_in_range("privacy_scores", privacy_scores, 0.0, 1.0)
        temperature = base_temperature + (max_temperature - base_temperature) * to_float(privacy_scores)
    t_col = temperature[..., None]
    sample = jax.random.normal if noise == "gaussian" else jax.random.laplace
    xi = sample(rng, shape, zs.dtype)
    # Noise in log space keeps q a distribution; excluded classes get none and stay at zero mass.
    noisy = jnp.where(is_masked(zt), -jnp.inf, zt / t_col + noise_scale * xi)
    kl = kl_from_log_probs(log_softmax(noisy), log_softmax(zs / t_col))
    return temperature**2 * kl
