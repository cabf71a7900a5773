"""ReviewKD as a method: attention-based fusion (ABF) of the student's features, coarse to fine, and the
hierarchical context loss to the teacher's."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_int
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight
from jaxkd.methods.features import module_apply, student_feature, teacher_feature
from jaxkd.methods.registry import register
from jaxkd.models.cifar_resnet import batch_norm

__all__ = ["reviewkd"]

# kaiming_uniform_(a=1): U(−√(3/fan_in), √(3/fan_in)); PyTorch's default Conv2d init for the attention conv.
_kaiming_uniform_a1 = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
_torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int):
    bound = 1.0 / max(fan_in, 1) ** 0.5
    return lambda rng, shape, dtype=jnp.float32: jax.random.uniform(rng, shape, dtype, -bound, bound)


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """PyTorch's ``F.interpolate(mode="nearest")`` of an NHWC map: output ``i`` takes input
    ``floor(i · in / out)``."""
    _, h, w, _ = x.shape
    if (h, w) == tuple(size):
        return x
    rows = (jnp.arange(size[0]) * h) // size[0]
    cols = (jnp.arange(size[1]) * w) // size[1]
    return x[:, rows][:, :, cols]


class ABF(nn.Module):
    """ReviewKD's attention-based fusion (dvlab-research/ReviewKD, ``CIFAR-100/model/reviewkd.py``), NHWC.

    ``x = BN(conv1x1(x))`` to ``mid`` channels; with ``fuse``, the coarser level's residual ``y`` is
    resized (nearest) to ``x``'s size and mixed by two sigmoid attention maps from a 1x1 conv of
    ``[x, y]``: ``x = x·a₀ + y·a₁``; ``x`` is resized to ``out_size`` if it differs; returns
    ``(BN(conv3x3(x)) with `out` channels, x)`` — the output compared with the teacher, and the residual
    passed to the next (finer) level."""

    mid: int
    out: int
    fuse: bool
    out_size: tuple[int, int]

    @nn.compact
    def __call__(self, x, y=None, *, train: bool):
        x = jnp.asarray(x, jnp.float32)
        x = nn.Conv(self.mid, (1, 1), use_bias=False, kernel_init=_kaiming_uniform_a1, name="conv1")(x)
        x = batch_norm(train, jnp.float32, "bn1")(x)
        if self.fuse:
            y = nearest_resize(y, x.shape[1:3])
            z = jnp.concatenate([x, y], axis=-1)
            z = nn.sigmoid(nn.Conv(2, (1, 1), kernel_init=_torch_conv_init, bias_init=_torch_bias_init(2 * self.mid),
                                   name="att_conv")(z))
            x = x * z[..., 0:1] + y * z[..., 1:2]
        x = nearest_resize(x, self.out_size)
        out = nn.Conv(self.out, (3, 3), padding=1, use_bias=False, kernel_init=_kaiming_uniform_a1, name="conv2")(x)
        return batch_norm(train, jnp.float32, "bn2")(out), x


class ReviewKDFusion(nn.Module):
    """The ABFs over the student's features, deepest first (the official ``ReviewKD.forward``): the deepest
    feature has no residual to fuse; each shallower one fuses the residual of the level below. Returns the
    fused maps in the input order (shallow to deep)."""

    mids: int
    outs: Sequence[int]
    out_sizes: Sequence[tuple[int, int]]

    @nn.compact
    def __call__(self, features, *, train: bool):
        n = len(features)
        results, residual = [None] * n, None
        for i in reversed(range(n)):
            abf = ABF(self.mids, self.outs[i], fuse=i < n - 1, out_size=tuple(self.out_sizes[i]), name=f"abf{i}")
            results[i], residual = abf(features[i], residual, train=train)
        return results


def _as_map(x):
    """``[B, C]`` embeddings as ``[B, 1, 1, C]`` maps (the official pooled ``f4`` is ``[B, C, 1, 1]``)."""
    if len(x.shape) != 2:
        return x
    shape = (x.shape[0], 1, 1, x.shape[-1])
    if isinstance(x, jax.ShapeDtypeStruct):  # init sees abstract features
        return jax.ShapeDtypeStruct(shape, x.dtype)
    return x.reshape(shape)


@register(
    "reviewkd", inputs="feature_maps",
    paper="Chen, Liu, Zhao & Jia, *Distilling Knowledge via Knowledge Review*, CVPR 2021",
    losses=("reviewkd",),
)
def reviewkd(
    *,
    student_features: Sequence[str] = ("stage1", "stage2", "stage3", "pooled"),
    teacher_features: Sequence[str] = ("stage1_preact", "stage2_preact", "stage3_preact", "pooled"),
    max_mid_channels: int = 512,
    warmup_steps: int = 0,
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "reviewkd",
) -> Method:
    """ReviewKD (Chen, Liu, Zhao & Jia, CVPR 2021), following dvlab-research/ReviewKD (``CIFAR-100``).

    The student's features (default: the stage outputs after ReLU and the pooled embedding as a 1x1 map —
    the official student wrapper calls ``is_feat=True`` without ``preact``) go through
    :class:`ReviewKDFusion` (trainable ABFs, ``mid = min(max_mid_channels, channels of the deepest
    student feature)``, each output with the paired teacher feature's channels and size); the loss is
    :func:`jaxkd.losses.reviewkd` (HCL) to the teacher's features (default: the pre-ReLU stage outputs
    and the pooled embedding, the official ``teacher(..., preact=True)[0][1:]``).

    ``warmup_steps``: the loss is scaled by ``min(1, step / warmup_steps)`` (the official
    ``min(1, epoch / 20)`` over 240 epochs, per step here; 0 disables). Official weights
    (``script/reviewKD.sh``): 5.0 for resnet32x4 → resnet8x4 and WRNs, 0.6 for resnet56 → resnet20,
    1.0 for resnet110 → resnet32: ``ce + 5 * reviewkd(warmup_steps=steps // 12)``.
    Metrics: ``warmup`` (the factor).
    """
    s_names, t_names = tuple(student_features), tuple(teacher_features)
    if not s_names or len(s_names) != len(t_names):
        raise ValueError(f"{name!r}: {len(s_names)} student features {s_names} but {len(t_names)} teacher features {t_names}")
    max_mid_channels = check_int("max_mid_channels", max_mid_channels, low=1)
    warmup_steps = check_int("warmup_steps", warmup_steps, low=0)

    def features(inputs: LossInputs):
        s = [_as_map(student_feature(inputs, n, method=name)) for n in s_names]
        t = [_as_map(teacher_feature(inputs, n, method=name, participant=teacher)) for n in t_names]
        for sn, tn, a, b in zip(s_names, t_names, s, t):
            if len(a.shape) != 4 or len(b.shape) != 4:
                raise ValueError(
                    f"{name!r} fuses feature maps [B, H, W, C] (or [B, C] embeddings); got student {sn!r} "
                    f"{tuple(a.shape)} and teacher {tn!r} {tuple(b.shape)}"
                )
        return s, t

    def fusion(s, t) -> ReviewKDFusion:
        return ReviewKDFusion(
            mids=min(max_mid_channels, int(s[-1].shape[-1])),
            outs=tuple(int(b.shape[-1]) for b in t),
            out_sizes=tuple((int(b.shape[1]), int(b.shape[2])) for b in t),
        )

    def init(rng, inputs: LossInputs) -> MethodVars:
        s, t = features(inputs)
        zeros = [jnp.zeros(f.shape, jnp.float32) for f in s]
        variables = dict(fusion(s, t).init({"params": rng}, zeros, train=False))
        return MethodVars(params=variables.pop("params"), state=variables)

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        s, t = features(inputs)
        fused, state = module_apply(fusion(s, t), vars, s)
        value = losses.reviewkd(fused, t, mask=inputs.example_mask)
        if warmup_steps:
            factor = jnp.minimum(1.0, inputs.step.astype(jnp.float32) / warmup_steps)
        else:
            factor = jnp.ones((), jnp.float32)
        return factor * value, LossAux({"warmup": factor}, state)

    return Method(name=name, loss=loss, init=init, weight=weight, needs=Needs(participants=(teacher,)))
