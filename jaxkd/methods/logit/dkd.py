"""Decoupled KD as a method, with mdistiller's warm-up of its weight."""

from __future__ import annotations

import optax

from jaxkd import losses
from jaxkd.checks import check_int, check_nonnegative, check_temperature
from jaxkd.methods.base import Method, Weight, logit_roles_method, multiply_weights
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["dkd", "warmup_schedule"]


def warmup_schedule(warmup_steps: int) -> optax.Schedule:
    """``min((step + 1) / warmup_steps, 1)`` as an optax schedule (constant 1 for ``warmup_steps = 0``).

    ``step`` is the optimizer step count before the update (0 on the first step), so the first step gets
    ``1/warmup_steps`` — mirroring mdistiller, whose epochs count from 1 (``min(epoch/warmup, 1)`` is
    ``1/20`` in the first epoch). mdistiller holds the factor constant within an epoch; here it ramps
    every step, so ``warmup_steps = warmup_epochs · steps_per_epoch`` reaches 1 at the same point.
    """
    warmup_steps = check_int("warmup_steps", warmup_steps, low=0)
    if warmup_steps == 0:
        return optax.constant_schedule(1.0)
    return optax.linear_schedule(1.0 / warmup_steps, 1.0, transition_steps=warmup_steps - 1)


@register("dkd", paper="Zhao et al., *Decoupled Knowledge Distillation*, CVPR 2022", losses=("dkd", "dkd_terms"),
          contract=LOGIT_ROLES)
def dkd(
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    warmup_steps: int = 0,
    standardize: bool = False,
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "dkd",
) -> Method:
    """Decoupled KD: ``α·TCKD + β·NCKD`` (:func:`jaxkd.losses.dkd`), optionally on standardized logits.

    Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022. ``warmup_steps > 0`` multiplies the weight
    by :func:`warmup_schedule` (mdistiller's CIFAR-100 recipe warms up over 20 of 240 epochs); a weight
    given as ``w * dkd(...)`` multiplies the warm-up. ``standardize=True`` is DKD + logit standardization
    (Sun et al., CVPR 2024; there ``α`` and ``β`` are multiplied by the KD weight, 9). Use with ``ce``:
    ``ce + dkd(...)``. Metrics: ``tckd`` and ``nckd`` (each ``T²``-scaled, before ``α``/``β``).
    ``student``/``teacher`` name the participants in the two roles, as in :func:`~jaxkd.methods.kd`
    (the teacher's logits are a gradient-stopped target).
    """
    check_temperature("temperature", temperature)
    check_nonnegative("alpha", alpha)
    check_nonnegative("beta", beta)

    def compute(zs, zt, inputs, rng):
        tckd, nckd = losses.dkd_terms(
            zs, zt, inputs.labels(name), temperature=temperature,
            standardize=standardize, mask=inputs.label_mask,
        )
        return alpha * tckd + beta * nckd, {"tckd": tckd, "nckd": nckd}

    weight = multiply_weights(weight, warmup_schedule(warmup_steps)) if warmup_steps else weight
    return logit_roles_method(name, compute, student=student, teacher=teacher, weight=weight, needs_labels=True)
