"""KD from several teachers (each a named participant) as a method."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_choice, check_teacher_weights, check_temperature
from jaxkd.methods.base import Method, Weight, check_roles, stateless_method
from jaxkd.methods.registry import register

__all__ = ["multi_teacher_kd"]


@register(
    "multi_teacher_kd",
    paper="You et al., *Learning from Multiple Teacher Networks*, 2017 (mixture); averaged-loss baseline of "
    "Zhang et al., *Confidence-Aware Multi-Teacher KD*, 2022",
    losses=("multi_teacher_kd",),
)
def multi_teacher_kd(
    *,
    teachers: Sequence[str] = ("teacher", "teacher2"),
    teacher_weights: Sequence[float] | None = None,
    temperature: float = 4.0,
    target: str = "losses",
    student: str = "student",
    weight: Weight = 1.0,
    name: str = "multi_teacher_kd",
) -> Method:
    """KD from the participants named in ``teachers`` (any architectures over the same classes):
    :func:`jaxkd.losses.multi_teacher_kd` with their logits stacked in the order given.

    ``teacher_weights=None`` averages the teachers; fixed weights (``teacher_weights=(0.7, 0.3)``) weight them as given.
    Metrics: ``<teacher>`` — each teacher's own (unweighted) ``T²·KL`` term, to see who pulls harder.

    ``student`` names the participant that learns (its logits are trained) and ``teachers`` those it learns
    from (gradient-stopped targets, trained or not): ``multi_teacher_kd(student="peer", teachers=("student",
    "teacher"))`` teaches a peer from the student and a teacher and never trains the student through it.
    """
    teachers = tuple(teachers)
    if len(teachers) < 1 or len(set(teachers)) != len(teachers) or not all(isinstance(t, str) for t in teachers):
        raise ValueError(f"teachers must be distinct participant names, got {teachers!r}")
    if student in teachers:
        raise ValueError(f"{name}: the student {student!r} cannot be one of its own teachers {teachers}")
    for t in teachers:
        check_roles(name, student, t)
    check_temperature("temperature", temperature)
    check_choice("target", target, ("losses", "mixture"))
    w = check_teacher_weights(len(teachers), teacher_weights)
    if target == "mixture" and abs(w.sum() - 1.0) > 1e-6:
        raise ValueError(f"target='mixture' needs teacher_weights that sum to 1, got {tuple(w)}")

    def compute(inputs, rng):
        zs, mask = inputs.output(student, method=name).logits, inputs.example_mask
        zt = jnp.stack([inputs.target(t, method=name).logits for t in teachers], axis=-2)
        value = losses.multi_teacher_kd(zs, zt, teacher_weights=tuple(w), temperature=temperature, target=target, mask=mask)
        metrics = {t: losses.kd(zs, zt[..., i, :], temperature=temperature, mask=mask) for i, t in enumerate(teachers)}
        return value, metrics

    return stateless_method(name, compute, weight=weight, participants=(student, *teachers),
                            trained=(student,))
