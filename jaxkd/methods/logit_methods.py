"""Method transforms for the named logit-level objectives of :mod:`jaxkd.losses.logit_methods`.

Each factory closes over its hyper-parameters (checked at construction) and returns a
:class:`~jaxkd.methods.base.Method` whose loss reads ``inputs.student.logits`` and the teacher's logits
under ``stop_gradient``, masks padded examples with ``batch["mask"]`` and reports its sub-terms as
metrics. Methods that need labels declare ``batch_keys=(label_key,)``.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from jaxkd import losses as _base_losses
from jaxkd.losses import logit_methods as L
from jaxkd.losses._core import check_in_range, check_positive, reduce_loss
from jaxkd.methods.base import (
    LossAux,
    LossInputs,
    Method,
    MethodVars,
    Weight,
    example_mask,
    require,
    require_teacher,
)

__all__ = ["bdkd", "dist", "dkd", "kd_ls", "nkd", "pld", "sinkd", "swing"]


def _nonnegative(name: str, value) -> None:
    check_in_range(name, value, 0.0, float("inf"))


def _logits(inputs: LossInputs, name: str):
    teacher = require_teacher(inputs, method=name)
    return inputs.student.logits, jax.lax.stop_gradient(teacher.logits)


def warmup_schedule(weight: Weight, warmup_steps: int) -> Weight:
    """``weight · min((step + 1) / warmup_steps, 1)``; ``weight`` itself may be a schedule.

    ``step`` is the optimizer step count before the update (0 on the first step), so the first step gets
    ``1/warmup_steps`` — mirroring mdistiller, whose epochs count from 1 (``min(epoch/warmup, 1)`` is
    ``1/20`` in the first epoch). mdistiller holds the factor constant within an epoch; here it ramps
    every step, so ``warmup_steps = warmup_epochs · steps_per_epoch`` reaches 1 at the same point.
    """
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got warmup_steps={warmup_steps!r}")
    if warmup_steps == 0:
        return weight
    warmup = float(warmup_steps)

    def schedule(step):
        ramp = jnp.minimum((jnp.asarray(step, jnp.float32) + 1.0) / warmup, 1.0)
        base = weight(step) if callable(weight) else weight
        return ramp * jnp.asarray(base, jnp.float32)

    return schedule


def dkd(
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    warmup_steps: int = 0,
    standardize: bool = False,
    weight: Weight = 1.0,
    label_key: str = "label",
    name: str = "dkd",
) -> Method:
    """Decoupled KD: ``α·TCKD + β·NCKD`` (:func:`jaxkd.losses.dkd`), optionally on standardized logits.

    Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022. ``warmup_steps > 0`` multiplies the weight
    by ``min((step + 1)/warmup_steps, 1)`` (see :func:`warmup_schedule`; mdistiller's CIFAR-100 recipe
    warms up over 20 epochs). ``standardize=True`` is DKD + logit standardization (Sun et al., CVPR 2024;
    there ``α`` and ``β`` are multiplied by the KD weight, 9). Use with ``ce``: ``ce + dkd(...)``.
    Metrics: ``tckd`` and ``nckd`` (each ``T²``-scaled, before ``α``/``β``).
    """
    check_positive("temperature", temperature)
    _nonnegative("alpha", alpha)
    _nonnegative("beta", beta)
    schedule = warmup_schedule(weight, warmup_steps)

    def loss(vars: MethodVars, inputs: LossInputs, rng: jax.Array):
        del rng
        zs, zt = _logits(inputs, name)
        labels = require(inputs.batch, label_key, method=name)
        tckd, nckd = L.dkd_terms(
            zs, zt, labels, temperature=temperature, standardize=standardize, mask=example_mask(inputs.batch)
        )
        return alpha * tckd + beta * nckd, LossAux({"tckd": tckd, "nckd": nckd}, vars.state)

    return Method(name=name, loss=loss, weight=schedule, needs_teacher=True, batch_keys=(label_key,))


def kd_ls(
    *, temperature: float = 2.0, standardize: bool = True, weight: Weight = 1.0, name: str = "kd_ls"
) -> Method:
    """KD with logit standardization: ``τ²·KL(sm(Z(z_t)/τ) ‖ sm(Z(z_s)/τ))`` (:func:`jaxkd.losses.ls_kd`).

    Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024. The official CIFAR-100 runs
    use ``τ = 2`` and a KD weight of 9 with CE weight 0.1: ``0.1 * ce + 9 * kd_ls(temperature=2)``.
    ``standardize=False`` gives plain Hinton KD at ``T = τ`` (the ablation).
    """
    check_positive("temperature", temperature)

    def loss(vars: MethodVars, inputs: LossInputs, rng: jax.Array):
        del rng
        zs, zt = _logits(inputs, name)
        mask = example_mask(inputs.batch)
        if standardize:
            value = L.ls_kd(zs, zt, temperature=temperature, mask=mask)
        else:
            value = _base_losses.kd(zs, zt, temperature=temperature, mask=mask)
        return value, LossAux({}, vars.state)

    return Method(name=name, loss=loss, weight=weight, needs_teacher=True)


def dist(
    *, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0, weight: Weight = 1.0, name: str = "dist"
) -> Method:
    """DIST: ``τ²·(β·inter + γ·intra)`` Pearson-correlation matching (:func:`jaxkd.losses.dist`).

    Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022. The official recipes use
    ``ce + dist(beta=2, gamma=2, temperature=4)`` on CIFAR-100 and ``temperature=1`` on ImageNet.
    Metrics: ``inter`` and ``intra`` (before ``β``, ``γ``, ``τ²``).
    """
    check_positive("temperature", temperature)
    _nonnegative("beta", beta)
    _nonnegative("gamma", gamma)

    def loss(vars: MethodVars, inputs: LossInputs, rng: jax.Array):
        del rng
        zs, zt = _logits(inputs, name)
        inter, intra = L.dist_terms(zs, zt, temperature=temperature, mask=example_mask(inputs.batch))
        value = temperature**2 * (beta * inter + gamma * intra)
        return value, LossAux({"inter": inter, "intra": intra}, vars.state)

    return Method(name=name, loss=loss, weight=weight, needs_teacher=True)


def nkd(
    *,
    temperature: float = 1.0,
    gamma: float = 1.5,
    form: str = "ce",
    weight: Weight = 1.0,
    label_key: str = "label",
    name: str = "nkd",
) -> Method:
    """Normalized KD: target ``−T_y log S_y`` + ``γλ²``·normalized non-target CE (:func:`jaxkd.losses.nkd`).

    Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation", ICCV 2023. Added to the
    label CE: ``ce + nkd(temperature=1, gamma=1.5)`` (ImageNet) or ``nkd(temperature=3, gamma=3.5)``
    (CIFAR-100). Metrics: ``target`` and ``nontarget``.
    """
    check_positive("temperature", temperature)
    _nonnegative("gamma", gamma)
    if form not in ("ce", "kl"):
        raise ValueError(f"form must be 'ce' (official code) or 'kl', got form={form!r}")

    def loss(vars: MethodVars, inputs: LossInputs, rng: jax.Array):
        del rng
        zs, zt = _logits(inputs, name)
        labels = require(inputs.batch, label_key, method=name)
        target, nontarget = L.nkd_terms(
            zs, zt, labels, temperature=temperature, gamma=gamma, form=form, mask=example_mask(inputs.batch)
        )
        return target + nontarget, LossAux({"target": target, "nontarget": nontarget}, vars.state)

    return Method(name=name, loss=loss, weight=weight, needs_teacher=True, batch_keys=(label_key,))


def pld(
    *, teacher_temperature: float = 1.0, weight: Weight = 1.0, label_key: str = "label", name: str = "pld"
) -> Method:
    """Plackett-Luce distillation (:func:`jaxkd.losses.pld`); it replaces CE + KD, so use it alone.

    Bassam, Zhu & Bian, "PLD: A Choice-Theoretic List-Wise Knowledge Distillation", 2025.
    """
    check_positive("teacher_temperature", teacher_temperature)

    def loss(vars: MethodVars, inputs: LossInputs, rng: jax.Array):
        del rng
        zs, zt = _logits(inputs, name)
        labels = require(inputs.batch, label_key, method=name)
        value = L.pld(zs, zt, labels, teacher_temperature=teacher_temperature, mask=example_mask(inputs.batch))
        return value, LossAux({}, vars.state)

    return Method(name=name, loss=loss, weight=weight, needs_teacher=True, batch_keys=(label_key,))


def sinkd(
    *,
    temperature: float = 2.0,
    epsilon: float = 0.1,
    iterations: int = 20,
    weight: Weight = 1.0,
    name: str = "sinkd",
) -> Method:
    """Batch-wise Sinkhorn distance between student and teacher predictions (:func:`jaxkd.losses.sinkhorn_distance`).

    Cui et al., "SinKD: Sinkhorn Distance Minimization for Knowledge Distillation", LREC-COLING 2024.
    The paper adds it to CE and KL: ``0.2 * ce + 0.8 * kd(...) + beta * sinkd()``. The plan here has
    uniform ``1/B`` marginals; the official all-ones marginals make its value ``B`` times larger, so the
    official ``0.8 × 0.001`` corresponds to ``weight = 0.0008 · B``.
    """
    check_positive("temperature", temperature)
    check_positive("epsilon", epsilon)
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or iterations < 1:
        raise ValueError(f"iterations must be a positive int (a fixed Sinkhorn loop), got iterations={iterations!r}")

    def loss(vars: MethodVars, inputs: LossInputs, rng: jax.Array):
        del rng
        zs, zt = _logits(inputs, name)
        value = L.sinkhorn_distance(
            zs, zt, temperature=temperature, epsilon=epsilon, iterations=int(iterations),
            mask=example_mask(inputs.batch),
        )
        return value, LossAux({}, vars.state)

    return Method(name=name, loss=loss, weight=weight, needs_teacher=True)


def bdkd(*, temperature: float = 4.0, weight: Weight = 1.0, name: str = "bdkd") -> Method:
    """BD-KD's student loss: entropy-balanced forward + reverse KL (:func:`jaxkd.losses.bdkd`).

    Amara et al., "BD-KD: Balancing the Divergences for Online Knowledge Distillation", 2022. The
    per-example weighting is a documented assumption (only the abstract was readable). Metrics:
    ``forward`` and ``reverse`` (the weighted terms) and ``w_forward`` (the mean forward weight).
    """
    check_positive("temperature", temperature)

    def loss(vars: MethodVars, inputs: LossInputs, rng: jax.Array):
        del rng
        zs, zt = _logits(inputs, name)
        mask = example_mask(inputs.batch)
        forward, reverse = L.bdkd_terms(zs, zt, temperature=temperature, mask=mask)
        w_forward, _ = L.bdkd_weights(zs, zt, temperature=temperature)
        metrics = {"forward": forward, "reverse": reverse, "w_forward": reduce_loss(w_forward, mask=mask)}
        return forward + reverse, LossAux(metrics, vars.state)

    return Method(name=name, loss=loss, weight=weight, needs_teacher=True)


def swing(
    *,
    base_temperature: float = 2.0,
    max_temperature: float | None = None,
    noise_scale: float = 0.1,
    noise: str = "gaussian",
    privacy_key: str | None = None,
    weight: Weight = 1.0,
    name: str = "swing",
) -> Method:
    """Swing distillation: KD with per-example temperatures and noisy teacher targets (:func:`jaxkd.losses.swing_kd`).

    Li et al., "Swing Distillation: A Privacy-Preserving Knowledge Distillation Framework", 2022. The
    temperature mapping and noise model are documented assumptions (only the abstract was readable).
    ``privacy_key`` names a batch entry of per-example privacy likelihoods in ``[0, 1]`` (shape of the
    logits without the class axis) that moves the temperature from ``base_temperature`` towards
    ``max_temperature``; without it the temperature is constant. The noise is drawn from the ``rng`` the
    train step passes, so it differs every step and is reproducible from the train state's key.
    """
    check_positive("base_temperature", base_temperature)
    if max_temperature is not None:
        check_positive("max_temperature", max_temperature)
    _nonnegative("noise_scale", noise_scale)
    if noise not in ("gaussian", "laplace"):
        raise ValueError(f"noise must be 'gaussian' or 'laplace', got noise={noise!r}")

    def loss(vars: MethodVars, inputs: LossInputs, rng: jax.Array):
        zs, zt = _logits(inputs, name)
        scores = None if privacy_key is None else require(inputs.batch, privacy_key, method=name)
        value = L.swing_kd(
            zs, zt, rng, base_temperature=base_temperature, max_temperature=max_temperature,
            privacy_scores=scores, noise_scale=noise_scale, noise=noise, mask=example_mask(inputs.batch),
        )
        return value, LossAux({}, vars.state)

    keys = () if privacy_key is None else (privacy_key,)
    return Method(name=name, loss=loss, weight=weight, needs_teacher=True, batch_keys=keys)
