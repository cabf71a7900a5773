"""HARD as a method: a learned affine augmentation that seeks the inputs teacher and student disagree on.

Nix, Burg & Sinz, "HARD: Hard Augmentations for Robust Distillation", 2023 (arXiv 2305.14890), with a
spatial-transformer (affine) augmentor, the simplest kind of augmentation model the paper names. Per step,
with the augmentor ``g_φ`` and per-example noise ``z``::

    x̃ = g_φ(x, z) = affine_warp(x, I + m·tanh(reshape(z·W + b)/m))   (W, b zero-initialized: the identity)
    D(θ, φ) = T² · KL(p_t(x̃) ‖ p_s(x̃))                            the teacher–student discrepancy
    C(φ)    = KL(p_t(x) ‖ p_t(x̃))                                  the teacher must see the same image
    student:   min_θ D            augmentor:   max_φ D − λ·C

**What is assumed.** Only the abstract was available to this implementation, and the official repository
(``sinzlab/HARD``) holds no code ("check here later"). The abstract fixes the idea — an augmentation model,
from simple spatial transformations upwards, trained to produce inputs teacher and student disagree on —
not the details: the augmentor's form (here a linear map of Gaussian noise to an offset of the identity
affine map, each entry softly bounded by ``m = max_offset``), the discrepancy (here the same ``T²``-scaled
KD the student minimizes) and what keeps the augmented images meaningful (here the teacher's own shift ``C``
with weight ``λ``, and the bound ``m``) are this implementation's choices.

**One jitted step.** A min-max is usually trained by alternating an augmentor update and a student update
with two optimizers. jaxkd puts both in the one minimized scalar ``D + λ·C``: the augmented image and the
teacher's logits enter ``D`` through a gradient reversal (:func:`~jaxkd.methods.spatial.reverse_gradient`),
so the optimizer's descent on ``D`` is an *ascent* for ``φ`` (gradient ``−∂D/∂φ + λ·∂C/∂φ``) while the student
descends (``+∂D/∂θ``). Both move at once with the student's optimizer and learning rate (simultaneous gradient
descent–ascent, not alternation); the augmentor's parameters are this method's parameters.

The loss re-runs both models on ``x̃`` itself (the step's own forward is on the clean batch): chain it with
``ce`` and ``kd`` for the clean-image terms. The student's re-run is in train mode; its BatchNorm statistics
from it are not kept (the main forward's are).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_int, check_nonnegative, check_positive, check_temperature
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight, check_roles
from jaxkd.methods.features import apply_participant
from jaxkd.methods.registry import register
from jaxkd.methods.spatial import IDENTITY_AFFINE, affine_warp, reverse_gradient, scale_gradient

__all__ = ["hard"]


def augmenter_theta(params: dict, noise: jax.Array, max_offset: float = 0.25) -> jax.Array:
    """The per-example affine maps ``[B, 2, 3]``: the identity plus a learned linear function of the noise,
    each entry bounded softly to ``±max_offset`` (``m·tanh(u/m)``: slope 1 at the identity)."""
    offset = noise @ params["kernel"] + params["bias"]
    offset = max_offset * jnp.tanh(offset / max_offset)
    return IDENTITY_AFFINE + offset.reshape(-1, 2, 3)


def augment(params: dict, images: jax.Array, noise: jax.Array, max_offset: float = 0.25) -> jax.Array:
    """The augmented images: ``images`` warped by :func:`augmenter_theta`."""
    return affine_warp(images, augmenter_theta(params, noise, max_offset))


@register(
    "hard",
    paper="Nix, Burg & Sinz, *HARD: Hard Augmentations for Robust Distillation*, 2023",
    losses=("kd",),
    status="from the paper's abstract (an affine augmentor; its noise-to-affine map and the teacher constraint "
    "are assumptions, no code released); min-max as a gradient reversal in one step",
)
def hard(
    *,
    temperature: float = 4.0,
    teacher_consistency: float = 1.0,
    noise_dim: int = 8,
    max_offset: float = 0.25,
    augmenter_lr_scale: float = 0.1,
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "hard",
) -> Method:
    """HARD (module docstring): KD on images an affine augmentor learns to make hard.

    ``teacher_consistency`` is ``λ``, the weight of ``KL(p_t(x) ‖ p_t(x̃))`` in the augmentor's objective (it
    keeps augmented images ones the teacher still reads as the original); ``noise_dim`` the width of the
    per-example noise the augmentor maps to an affine offset; ``max_offset`` bounds each entry of that
    offset, in the normalized coordinates of ``affine_warp`` where the image spans ``[−1, 1]`` (``0.5`` is a
    shift by a quarter of the image, or a ±50% scale or shear); ``augmenter_lr_scale`` multiplies the
    augmentor's gradient (its learning rate relative to the student's). These two defaults are not the
    paper's: on a 40-step digits run (resnet20 teacher), ``max_offset=0.5`` at the student's learning rate
    drove the offsets to the bound within 10 steps and shifted the teacher's own prediction by ~2 nats;
    ``0.25`` and ``0.1`` kept them at about half the bound (teacher shift ~0.7).

    The participants' model input must be ``[B, H, W, C]`` images (the student's input key; the teacher gets
    the same augmented images). The reported value is ``D + λ·C``. Metrics: ``discrepancy`` (``D``),
    ``teacher_shift`` (``C``), ``offset`` (the mean absolute deviation of the affine maps from the identity).
    """
    check_temperature("temperature", temperature)
    check_nonnegative("teacher_consistency", teacher_consistency)
    noise_dim = check_int("noise_dim", noise_dim, low=1)
    check_positive("max_offset", max_offset)
    check_positive("augmenter_lr_scale", augmenter_lr_scale)
    check_roles(name, student, teacher)

    def init(rng, inputs: LossInputs) -> MethodVars:
        del rng  # zeros: the augmentor starts as the identity, whatever the noise
        params = {"kernel": jnp.zeros((noise_dim, 6), jnp.float32), "bias": jnp.zeros(6, jnp.float32)}
        return MethodVars(params={"augmenter": params})

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        images = inputs.model_input_of(inputs.batch, student)
        if not hasattr(images, "ndim") or images.ndim != 4:
            raise ValueError(f"{name} augments [batch, height, width, channels] images; the {student!r} input is "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        noise_key, dropout_key = jax.random.split(rng)
        noise = jax.random.normal(noise_key, (images.shape[0], noise_dim), jnp.float32)
        augmenter = scale_gradient(vars.params["augmenter"], augmenter_lr_scale)
        theta = augmenter_theta(augmenter, noise, max_offset)
        augmented = affine_warp(images, theta)
        mask = inputs.example_mask

        teacher_augmented = apply_participant(inputs, teacher, augmented, train=False, method=name).logits
        teacher_clean = inputs.target(teacher, method=name).logits
        # The augmentor's own constraint: descended (its gradient is +λ·∂C/∂φ).
        shift = losses.kd(teacher_augmented, teacher_clean, temperature=1.0, mask=mask)
        # The discrepancy: the student descends it; through the reversals the augmentor ascends it.
        student_augmented = apply_participant(inputs, student, reverse_gradient(augmented), train=True, method=name,
                                              rngs={"dropout": dropout_key}).logits
        discrepancy = losses.kd(student_augmented, reverse_gradient(teacher_augmented), temperature=temperature,
                                mask=mask)
        offset = jnp.mean(jnp.abs(theta - IDENTITY_AFFINE))
        metrics = {"discrepancy": discrepancy, "teacher_shift": shift, "offset": offset}
        return discrepancy + teacher_consistency * shift, LossAux(metrics, vars.state)

    return Method(name=name, loss=loss, init=init, weight=weight,
                  needs=Needs(participants=(teacher,), trained=(student,)))
