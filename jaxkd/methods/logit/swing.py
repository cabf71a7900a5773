"""Swing distillation as a method."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_choice, check_nonnegative, check_temperature
from jaxkd.methods.base import Method, Weight, logit_roles_method, require
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["swing"]


@register(
    "swing",
    paper="Li et al., *Swing Distillation: A Privacy-Preserving KD Framework*, 2022",
    losses=("swing",),
    status="from the paper's text",
    contract=LOGIT_ROLES,
)
def swing(
    *,
    base_temperature: float = 2.0,
    max_temperature: float | None = None,
    noise_scale: float = 0.1,
    noise: str = "gaussian",
    privacy_key: str | None = None,
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "swing",
) -> Method:
    """Swing distillation: KD with per-example temperatures and noisy teacher targets
    (:func:`jaxkd.losses.swing`).

    Li et al., "Swing Distillation: A Privacy-Preserving Knowledge Distillation Framework", 2022. The
    temperature mapping and noise model are documented assumptions (only the abstract was readable).
    ``privacy_key`` names a batch entry of per-example privacy likelihoods in ``[0, 1]`` (shape of the
    logits without the class axis) that moves the temperature from ``base_temperature`` towards
    ``max_temperature``; without it the temperature is constant. The noise is drawn from the ``rng`` the
    train step passes, so it differs every step and is reproducible from the train state's key.
    ``student``/``teacher`` name the participants in the two roles, as in :func:`~jaxkd.methods.kd`
    (the teacher's logits are a gradient-stopped target).
    """
    check_temperature("base_temperature", base_temperature)
    if max_temperature is not None:
        check_temperature("max_temperature", max_temperature)
    check_nonnegative("noise_scale", noise_scale)
    check_choice("noise", noise, ("gaussian", "laplace"))

    def compute(zs, zt, inputs, rng):
        scores = None if privacy_key is None else require(inputs.batch, privacy_key, method=name)
        return losses.swing(
            zs, zt, rng, base_temperature=base_temperature,
            max_temperature=max_temperature, privacy_scores=scores, noise_scale=noise_scale, noise=noise,
            mask=inputs.example_mask,
        )

    return logit_roles_method(name, compute, student=student, teacher=teacher, weight=weight,
                              batch_keys=() if privacy_key is None else (privacy_key,))
