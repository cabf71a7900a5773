"""Factor transfer as a method: a paraphraser trained to reconstruct the teacher's last map, then frozen;
a translator on the student's map imitates its factor — both stages in one train state."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import losses
from jaxkd.checks import check_int, check_nonnegative, check_number
from jaxkd.methods.base import (LossAux, LossInputs, Method, MethodVars, Needs, StepInfo, Weight, check_weight,
                                resolve_weight)
from jaxkd.methods.feature.connectors import _torch_bias_init, _torch_kernel_init
from jaxkd.methods import features
from jaxkd.methods.features import module_apply, module_init
from jaxkd.methods.registry import register
from jaxkd.methods.feature.vid import match_spatial
from jaxkd.models.cifar_resnet import batch_norm

__all__ = ["factor_transfer"]

# PyTorch's ConvTranspose2d computes its default init's fan-in from weight.size(1) = out_channels:
# U(±1/√(out·k·k)); Flax's fan_out of a (k, k, in, out) kernel is that number.
_torch_transpose_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


def _conv(features: int, fan_in: int, name: str) -> nn.Conv:
    return nn.Conv(features, (3, 3), padding=1, kernel_init=_torch_kernel_init, bias_init=_torch_bias_init(fan_in),
                   name=name)


def _leaky(x):
    return nn.leaky_relu(x, 0.1)


class Paraphraser(nn.Module):
    """RepDistiller's FT ``Paraphraser`` (``models/util.py``, ``use_bn=False``): an encoder of three 3x3
    convolutions (``C → C → kC → kC``, LeakyReLU 0.1 after each) giving the factor, and a decoder of three
    3x3 stride-1 transposed convolutions (``kC → kC → C → C``, LeakyReLU 0.1 after each) reconstructing
    the map. ``__call__`` returns ``(factor, reconstruction)``; ``encode`` the factor alone."""

    channels: int
    rate: float = 0.5

    def setup(self):
        c, k = self.channels, max(int(self.channels * self.rate), 1)
        self.encoder = [_conv(c, 9 * c, "enc0"), _conv(k, 9 * c, "enc1"), _conv(k, 9 * k, "enc2")]
        # A stride-1 transposed 3x3 convolution with PyTorch padding 1 pads its input by k − 1 − p = 1.
        self.decoder = [
            nn.ConvTranspose(width, (3, 3), padding=((1, 1), (1, 1)), kernel_init=_torch_transpose_kernel_init,
                             bias_init=_torch_bias_init(9 * width), name=f"dec{i}")
            for i, width in enumerate((k, c, c))
        ]

    def encode(self, x):
        x = jnp.asarray(x, jnp.float32)
        for layer in self.encoder:
            x = _leaky(layer(x))
        return x

    def __call__(self, x, *, train: bool = False):
        del train
        factor = self.encode(x)
        x = factor
        for layer in self.decoder:
            x = _leaky(layer(x))
        return factor, x


class Translator(nn.Module):
    """RepDistiller's FT ``Translator`` (``use_bn=True``): three 3x3 convolutions (``C_s → C_s → kC_t →
    kC_t``), each followed by BatchNorm and LeakyReLU 0.1, mapping the student's map to a factor of the
    paraphraser's width."""

    channels: int
    rate: float = 0.5

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = jnp.asarray(x, jnp.float32)
        c_s, k = x.shape[-1], max(int(self.channels * self.rate), 1)
        for i, (width, fan_in) in enumerate(((c_s, 9 * c_s), (k, 9 * c_s), (k, 9 * k))):
            x = _leaky(batch_norm(train, jnp.float32, f"bn{i}")(_conv(width, fan_in, f"conv{i}")(x)))
        return x


@register(
    "factor_transfer", inputs="feature_maps", example="paraphraser_steps=0",
    paper="Kim, Park & Kwak, *Paraphrasing Complex Network: Network Compression via Factor Transfer*, NeurIPS 2018",
    losses=("factor_transfer", "paraphraser_reconstruction"),
)
def factor_transfer(
    *,
    paraphraser_steps: int,
    student_feature: str = "stage3",
    teacher_feature: str | None = None,
    rate: float = 0.5,
    power: int | None = 2,
    reconstruction_weight: float = 1.0,
    weight: Weight = 1.0,
    name: str = "factor_transfer",
) -> Method:
    """Factor transfer, both stages: the paraphraser's training, then the student's.

    Kim, Park & Kwak, NeurIPS 2018, as RepDistiller runs it (``--distill factor``, on ``feat[-2]``, the
    CIFAR ResNets' ``stage3``):

    1. steps ``< paraphraser_steps``: the :class:`Paraphraser` (method parameters) learns to reconstruct
       the teacher's map, :func:`jaxkd.losses.paraphraser_reconstruction` (MSE), weighted by
       ``reconstruction_weight``. Nothing else gets a gradient from this method.
    2. steps ``>= paraphraser_steps``: the paraphraser is frozen, and the student and the
       :class:`Translator` (method parameters) learn :func:`jaxkd.losses.factor_transfer` between the
       translator's factor of the student's map and the frozen paraphraser's factor of the teacher's map
       (the larger map average-pooled to the smaller's size first), weighted by ``weight``.

    The method's weight is the schedule ``reconstruction_weight`` then ``weight``; RepDistiller's recipe
    (30 epochs of paraphraser training at learning rate 0.01, then 240 epochs of ``CE + 200 · FT`` at
    0.05; cross-entropy is not trained in the first stage) is::

        after(n) * ce + factor_transfer(paraphraser_steps=n, weight=200, reconstruction_weight=0.2)

    with ``n`` the steps of 30 epochs (``0.2 = 0.01 / 0.05``: the paraphraser's smaller learning rate,
    for plain SGD). Pass the factor weight as ``weight=``: a multiplier in front (``200 * factor_transfer(...)``)
    would scale the reconstruction stage as well.

    **Frozen means frozen.** Stopping the gradient is not enough: an optimizer with momentum keeps moving
    parameters whose gradient became zero, and weight decay shrinks them. The paraphraser therefore lives
    twice: its trained parameters (``params["paraphraser"]``, used by the reconstruction term only) and a
    copy in the method state (``state["paraphraser"]``) that :attr:`Method.update` refreshes after every
    first-stage step and then never again; the second stage reads the copy. The translator's BatchNorm
    statistics are kept unchanged during the first stage (RepDistiller does not run it there).

    Differences from RepDistiller: one optimizer for both stages (RepDistiller's paraphraser has its own
    SGD; its learning rate is emulated by ``reconstruction_weight`` under plain SGD only, and momentum
    carries across the boundary for the student), and the student's BatchNorm statistics follow the
    first stage's batches (RepDistiller runs the student in eval mode there). ``paraphraser_steps=0``
    freezes the randomly initialized paraphraser. ``power=None`` compares the factors themselves, as the
    paper and the authors' code do (see :func:`jaxkd.losses.factor_transfer`).

    Metrics: ``reconstruction`` (the current paraphraser's MSE) and ``factor`` (the factor loss against
    the frozen copy), both unweighted, every step.
    """
    n = check_int("paraphraser_steps", paraphraser_steps, low=0)
    check_number("rate", rate, low=0.0, high=1.0, low_open=True)
    if power is not None:
        check_int("power", power, low=1)
    check_nonnegative("reconstruction_weight", reconstruction_weight)
    check_weight(weight)
    s_name = student_feature
    t_name = s_name if teacher_feature is None else teacher_feature

    def feats(inputs: LossInputs):
        s = features.student_feature(inputs, s_name, method=name)
        t = features.teacher_feature(inputs, t_name, method=name)
        match_spatial(s, t, method=name)  # checks both are NHWC maps of nested sizes
        return s, t

    def modules(s_shape, t_shape):
        return Paraphraser(int(t_shape[-1]), rate), Translator(int(t_shape[-1]), rate)

    def init(rng, inputs: LossInputs) -> MethodVars:
        s, t = feats(inputs)
        paraphraser, translator = modules(s.shape, t.shape)
        rp, rt = jax.random.split(rng)
        p, tr = module_init(paraphraser, rp, t), module_init(translator, rt, s)
        return MethodVars(
            params={"paraphraser": p.params, "translator": tr.params},
            state={"paraphraser": jax.tree.map(jnp.copy, p.params), "translator": tr.state},
        )

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        s, t = feats(inputs)
        paraphraser, translator = modules(s.shape, t.shape)
        first_stage = inputs.step < n
        mask = inputs.example_mask
        _, reconstruction = paraphraser.apply({"params": vars.params["paraphraser"]}, t)
        rec = losses.paraphraser_reconstruction(reconstruction, t, mask=mask)
        frozen = jax.lax.stop_gradient(vars.state["paraphraser"])
        factor_t = paraphraser.apply({"params": frozen}, t, method=Paraphraser.encode)
        factor_s, bn = module_apply(translator, MethodVars(vars.params["translator"], vars.state["translator"]), s)
        factor_s, factor_t = match_spatial(factor_s, factor_t, method=name)
        fac = losses.factor_transfer(factor_s, factor_t, power=power, mask=mask)
        value = jnp.where(first_stage, rec, fac)
        bn = jax.tree.map(lambda old, new: jnp.where(first_stage, old, new), vars.state["translator"], bn)
        state = {"paraphraser": vars.state["paraphraser"], "translator": bn}
        return value, LossAux({"reconstruction": rec, "factor": fac}, state)

    def update(params, state, info: StepInfo):
        # info.step counts the update just applied: steps 1..n finished the first stage's updates.
        trained = info.step <= n
        copy = jax.tree.map(lambda new, old: jnp.where(trained, new, old), params["paraphraser"], state["paraphraser"])
        return {**state, "paraphraser": copy}

    stage_weight = lambda step: jnp.where(  # noqa: E731
        jnp.asarray(step) < n, jnp.float32(reconstruction_weight), resolve_weight(weight, step))
    return Method(name=name, loss=loss, init=init, update=update, weight=stage_weight,
                  needs=Needs(participants=("teacher",)))
