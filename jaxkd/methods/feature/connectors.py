"""Standard connectors: the small trainable modules that map a student feature to a teacher feature's shape.

Each is a Linen module taking ``(x, *, train)``; build its variables with
:func:`jaxkd.methods.features.module_init` from the abstract shapes a method's ``init`` receives. The
``*_between(student_shape, teacher_shape)`` constructors size them from the two features and raise a
``ValueError`` naming both shapes when no connector of that kind can reconcile them.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxkd.losses.core import l2_normalize
from jaxkd.models.cifar_resnet import batch_norm

__all__ = ["ConvRegressor", "LinearConnector", "LinearEmbed", "connector_between", "conv_regressor_between"]

# PyTorch's default Conv2d / Linear init (kaiming_uniform with a=√5): U(−1/√fan_in, 1/√fan_in) for weight and bias.
_torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int):
    bound = 1.0 / max(fan_in, 1) ** 0.5
    return lambda rng, shape, dtype=jnp.float32: nn.initializers.uniform(2 * bound)(rng, shape, dtype) - bound


class ConvRegressor(nn.Module):
    """RepDistiller's ``ConvReg`` (FitNets' regressor, ``distiller_zoo``/``models/util.py``): a convolution
    that maps an NHWC student map to the teacher's channels and spatial size, then BatchNorm and (with
    ``use_relu``) ReLU.

    ``mode``: ``"down2"`` (student twice the teacher's size: 3x3 stride 2, padding 1), ``"up2"`` (half the
    size: 4x4 transposed convolution, stride 2, padding 1), or ``"valid"`` (student at least the teacher's
    size: a ``(1 + H_s − H_t) x (1 + W_s − W_t)`` convolution without padding; 1x1 for equal sizes).
    """

    channels: int
    mode: str = "valid"
    kernel: tuple[int, int] = (1, 1)
    use_relu: bool = True

    @nn.compact
    def __call__(self, x, *, train: bool):
        fan_in = x.shape[-1] * (9 if self.mode == "down2" else 16 if self.mode == "up2" else self.kernel[0] * self.kernel[1])
        common = dict(kernel_init=_torch_kernel_init, bias_init=_torch_bias_init(fan_in), name="conv")
        if self.mode == "down2":
            x = nn.Conv(self.channels, (3, 3), strides=2, padding=1, **common)(x)
        elif self.mode == "up2":
            # PyTorch's ConvTranspose2d(k=4, s=2, p=1) = a stride-2 transposed conv padded k−1−p = 2 per side.
            x = nn.ConvTranspose(self.channels, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), **common)(x)
        else:
            x = nn.Conv(self.channels, self.kernel, padding="VALID", **common)(x)
        x = batch_norm(train, jnp.float32, "bn")(x)
        return nn.relu(x) if self.use_relu else x


def _describe(shape: Sequence[int]) -> str:
    return f"{tuple(shape)}"


def conv_regressor_between(
    student_shape: Sequence[int], teacher_shape: Sequence[int], *, use_relu: bool = True
) -> ConvRegressor:
    """The :class:`ConvRegressor` from an NHWC student map to an NHWC teacher map (RepDistiller's rule)."""
    if len(student_shape) != 4 or len(teacher_shape) != 4:
        raise ValueError(
            f"a convolutional connector maps [B, H, W, C] maps, got student feature {_describe(student_shape)} and "
            f"teacher feature {_describe(teacher_shape)}"
        )
    (_, s_h, s_w, _), (_, t_h, t_w, t_c) = student_shape, teacher_shape
    if s_h == 2 * t_h and s_w == 2 * t_w:
        return ConvRegressor(t_c, "down2", use_relu=use_relu)
    if 2 * s_h == t_h and 2 * s_w == t_w:
        return ConvRegressor(t_c, "up2", use_relu=use_relu)
    if s_h >= t_h and s_w >= t_w:
        return ConvRegressor(t_c, "valid", (1 + s_h - t_h, 1 + s_w - t_w), use_relu=use_relu)
    raise ValueError(
        f"no convolutional connector maps the student's {s_h}x{s_w} map to the teacher's {t_h}x{t_w} map "
        f"(student {_describe(student_shape)}, teacher {_describe(teacher_shape)}): the student map must be twice, "
        "half, or at least the teacher's size; pick features of compatible resolution"
    )


class LinearConnector(nn.Module):
    """A linear map of the last axis (embeddings ``[B, D]`` or tokens ``[B, N, D]``) to ``features``."""

    features: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        del train
        return nn.Dense(self.features, kernel_init=_torch_kernel_init, bias_init=_torch_bias_init(x.shape[-1]))(
            jnp.asarray(x, jnp.float32)
        )


class LinearEmbed(nn.Module):
    """CRD's ``Embed`` (RepDistiller ``crd/criterion.py``): flatten, linear to ``dim``, L2-normalize."""

    dim: int = 128
    normalize: bool = True

    @nn.compact
    def __call__(self, x, *, train: bool):
        del train
        x = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
        x = nn.Dense(self.dim, kernel_init=_torch_kernel_init, bias_init=_torch_bias_init(x.shape[-1]))(x)
        return l2_normalize(x, axis=-1) if self.normalize else x


def connector_between(student_shape: Sequence[int], teacher_shape: Sequence[int], *, use_relu: bool = True) -> nn.Module:
    """The default connector between two features: :class:`ConvRegressor` for NHWC maps, a
    :class:`LinearConnector` for embeddings or token sequences of the same length.

    Raises ``ValueError`` naming both shapes when the ranks differ or the token counts differ.
    """
    student_shape, teacher_shape = tuple(student_shape), tuple(teacher_shape)
    if len(student_shape) != len(teacher_shape):
        raise ValueError(
            f"no connector reconciles a rank-{len(student_shape)} student feature {student_shape} with a "
            f"rank-{len(teacher_shape)} teacher feature {teacher_shape}; distill features of the same kind "
            "(maps with maps, embeddings with embeddings) or pool one first"
        )
    if len(student_shape) == 4:
        return conv_regressor_between(student_shape, teacher_shape, use_relu=use_relu)
    if len(student_shape) in (2, 3):
        if student_shape[1:-1] != teacher_shape[1:-1]:
            raise ValueError(
                f"a linear connector maps the last axis only; student feature {student_shape} and teacher feature "
                f"{teacher_shape} differ in the token axis"
            )
        return LinearConnector(teacher_shape[-1])
    raise ValueError(f"no default connector for features of rank {len(student_shape)} ({student_shape}, {teacher_shape})")
