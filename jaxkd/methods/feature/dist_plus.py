"""DIST+ as a method: DIST's logit relations plus the channel and spatial relations of a feature map."""

from __future__ import annotations

import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_nonnegative, check_temperature
from jaxkd.methods.base import LossInputs, Method, Weight, stateless_method
from jaxkd.methods import features
from jaxkd.methods.registry import register

__all__ = ["dist_plus"]


@register(
    "dist_plus", inputs="feature_maps", same_width=True,
    paper="Huang et al., *DIST+: Knowledge Distillation From a Stronger Adaptive Teacher*, TPAMI 2025",
    losses=("dist_terms", "dist_plus_feature_terms"),
    status="supported (torchdistill's DISTPlusLoss, the channel term as 1 − ρ; no official code checked)",
)
def dist_plus(
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    iota: float = 1.0,
    kappa: float = 1.0,
    temperature: float = 1.0,
    student_feature: str = "stage3",
    teacher_feature: str | None = None,
    weight: Weight = 1.0,
    name: str = "dist_plus",
) -> Method:
    """DIST+: ``τ²·(β·inter + γ·intra) + ι·channel + κ·spatial``.

    ``inter``, ``intra``: DIST's logit relations (:func:`jaxkd.losses.dist_terms`); ``channel``,
    ``spatial``: the relations of the student's and the teacher's ``student_feature`` maps (``stage3``,
    the last map; same shape) from :func:`jaxkd.losses.dist_plus_feature_terms`. The weights are named as
    torchdistill's ``DISTPlusLoss`` *computes* them (its ``forward``: ``gamma`` the intra-class term, as
    in DIST, ``iota`` the channel term, ``kappa`` the spatial term — its docstring lists them
    differently); its ImageNet sample is ``ce + 2 * dist_plus(beta=2, gamma=2)``. Metrics: ``inter``,
    ``intra``, ``channel``, ``spatial`` (before weights and ``τ²``).
    """
    for n, v in (("beta", beta), ("gamma", gamma), ("iota", iota), ("kappa", kappa)):
        check_nonnegative(n, v)
    check_temperature("temperature", temperature)
    t_name = student_feature if teacher_feature is None else teacher_feature

    def compute(inputs: LossInputs, rng):
        mask = inputs.example_mask
        zs, zt = inputs.output("student", method=name).logits, inputs.target("teacher", method=name).logits
        inter, intra = losses.dist_terms(zs, zt, temperature=temperature, mask=mask)
        fs = features.student_feature(inputs, student_feature, method=name)
        ft = features.teacher_feature(inputs, t_name, method=name)
        channel, spatial = losses.dist_plus_feature_terms(fs, ft, mask=mask)
        value = temperature**2 * (beta * inter + gamma * intra) + iota * channel + kappa * spatial
        metrics = {"inter": inter, "intra": intra, "channel": channel, "spatial": spatial}
        return jnp.asarray(value, jnp.float32), metrics

    return stateless_method(name, compute, weight=weight, participants=("teacher",))
