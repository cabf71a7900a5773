"""Variational information distillation as a method: a 1x1-conv regressor per feature pair predicting the
teacher's map, with a learned per-channel variance."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import losses
from jaxkd.checks import check_int, check_number, check_positive
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight
from jaxkd.methods.feature.connectors import _torch_kernel_init
from jaxkd.methods.features import module_apply, module_init, student_feature, teacher_feature
from jaxkd.methods.registry import register

__all__ = ["vid"]


class VIDRegressor(nn.Module):
    """RepDistiller's VID regressor and variance (``distiller_zoo/VID.py``): ``conv1x1 → ReLU → conv1x1 →
    ReLU → conv1x1`` (bias-free, PyTorch's default init) from the student's channels through ``mid``
    channels to the teacher's ``channels``, and the per-channel parameter ``log_scale`` ``α`` of the
    variance ``softplus(α) + ε``, initialized so the variance starts at ``init_pred_var``.

    Returns ``(prediction, log_scale)``.
    """

    channels: int
    mid: int
    init_pred_var: float = 5.0
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x, *, train: bool):
        del train
        x = jnp.asarray(x, jnp.float32)
        for i, width in enumerate((self.mid, self.mid, self.channels)):
            if i:
                x = nn.relu(x)
            x = nn.Conv(width, (1, 1), use_bias=False, kernel_init=_torch_kernel_init, name=f"conv{i}")(x)
        start = float(np.log(np.expm1(self.init_pred_var - self.eps)))  # softplus⁻¹(init_pred_var − ε)
        log_scale = self.param("log_scale", nn.initializers.constant(start), (self.channels,), jnp.float32)
        return x, log_scale


def match_spatial(student: jax.Array, teacher: jax.Array, *, method: str) -> tuple[jax.Array, jax.Array]:
    """Average-pools the larger of two NHWC maps to the other's height and width (RepDistiller's
    ``adaptive_avg_pool2d`` in VID and FT), for sizes that divide; other sizes raise ``ValueError`` naming
    both shapes. Abstract inputs (``jax.ShapeDtypeStruct``) are only checked and returned as they are."""
    s_shape, t_shape = tuple(np.shape(student)), tuple(np.shape(teacher))
    if len(s_shape) != 4 or len(t_shape) != 4:
        raise ValueError(f"{method!r} distills [B, H, W, C] maps, got student {s_shape} and teacher {t_shape}")
    (sh, sw), (th, tw) = s_shape[1:3], t_shape[1:3]
    if (sh, sw) == (th, tw):
        return student, teacher
    big_is_student = sh >= th and sw >= tw
    if not big_is_student and not (sh <= th and sw <= tw):
        raise ValueError(f"{method!r}: the student map {s_shape} and the teacher map {t_shape} are not nested in size")
    (bh, bw), (h, w) = ((sh, sw), (th, tw)) if big_is_student else ((th, tw), (sh, sw))
    if bh % h or bw % w:
        raise ValueError(
            f"{method!r}: cannot average-pool a {bh}x{bw} map to {h}x{w} (student {s_shape}, teacher {t_shape}): "
            "one map's size must be a multiple of the other's"
        )
    if isinstance(student, jax.ShapeDtypeStruct) or isinstance(teacher, jax.ShapeDtypeStruct):
        return student, teacher

    def pool(x):
        b, _, _, c = x.shape
        return jnp.mean(x.reshape(b, h, bh // h, w, bw // w, c), axis=(2, 4))

    return (pool(student), teacher) if big_is_student else (student, pool(teacher))


@register(
    "vid", inputs="feature_maps",
    paper="Ahn, Hu, Damianou, Lawrence & Dai, *Variational Information Distillation for Knowledge Transfer*, CVPR 2019",
    losses=("vid",),
)
def vid(
    *,
    student_features: Sequence[str] = ("stage1", "stage2", "stage3"),
    teacher_features: Sequence[str] | None = None,
    mid_channels: int | None = None,
    init_pred_var: float = 5.0,
    eps: float = 1e-5,
    weight: Weight = 1.0,
    name: str = "vid",
) -> Method:
    """Variational information distillation (:func:`jaxkd.losses.vid`), summed over the feature pairs.

    Ahn et al., CVPR 2019, as RepDistiller runs it (``VIDLoss(s_C, t_C, t_C)`` on ``feat[1:-1]``, every
    stage's output of the CIFAR ResNets): per pair, a :class:`VIDRegressor` (its own parameters, trained
    with the student) predicts the teacher's map from the student's, after average-pooling the larger map
    to the smaller's size; ``mid_channels`` defaults to the teacher's channels. RepDistiller's CIFAR
    setting is ``ce + vid``. Metrics: the term of each pair, named by the student feature.
    """
    s_names = (student_features,) if isinstance(student_features, str) else tuple(student_features)
    t_names = s_names if teacher_features is None else (
        (teacher_features,) if isinstance(teacher_features, str) else tuple(teacher_features))
    if not s_names or len(s_names) != len(t_names):
        raise ValueError(f"vid needs one teacher feature per student feature, got {s_names} and {t_names}")
    if mid_channels is not None:
        mid_channels = check_int("mid_channels", mid_channels, low=1)
    check_positive("eps", eps)
    check_number("init_pred_var", init_pred_var, low=eps, low_open=True)

    def pairs(inputs: LossInputs):
        for j, (s_name, t_name) in enumerate(zip(s_names, t_names)):
            s = student_feature(inputs, s_name, method=name)
            t = teacher_feature(inputs, t_name, method=name)
            yield str(j), s_name, s, t

    def regressor(t_shape) -> VIDRegressor:
        c = int(t_shape[-1])
        return VIDRegressor(c, mid_channels or c, init_pred_var=init_pred_var, eps=eps)

    def init(rng, inputs: LossInputs) -> MethodVars:
        params = {}
        for (key, _, s, t), r in zip(pairs(inputs), jax.random.split(rng, len(s_names))):
            match_spatial(s, t, method=name)  # checks the sizes at create
            params[key] = module_init(regressor(t.shape), r, s).params  # 1x1 convolutions: any spatial size
        return MethodVars(params=params)

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        total, metrics = jnp.zeros((), jnp.float32), {}
        for key, s_name, s, t in pairs(inputs):
            s, t = match_spatial(s, t, method=name)
            (prediction, log_scale), _ = module_apply(regressor(t.shape), MethodVars(vars.params[key]), s)
            value = losses.vid(prediction, t, log_scale, eps=eps, mask=inputs.example_mask)
            total = total + value
            if len(s_names) > 1:
                metrics[s_name] = value
        return total, LossAux(metrics, vars.state)

    return Method(name=name, loss=loss, init=init, weight=weight, needs=Needs(participants=("teacher",)))
