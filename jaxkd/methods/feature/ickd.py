"""ICKD as a method: inter-channel correlation of the last feature map, through a 1x1 conv + BN connector."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.methods.base import Method, Weight
from jaxkd.methods.features import feature_method
from jaxkd.methods.registry import register
from jaxkd.models.cifar_resnet import batch_norm

__all__ = ["ickd"]

_torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class ICKDEmbed(nn.Module):
    """ICKD's ``Embed`` (ADLab-AutoDrive/ICKD, ``Cifar100/distiller_zoo/ICKD.py``): a bias-free 1x1
    convolution to the teacher's channels, then BatchNorm (no ReLU)."""

    channels: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.Conv(self.channels, (1, 1), use_bias=False, kernel_init=_torch_conv_init, name="conv")(
            jnp.asarray(x, jnp.float32)
        )
        return batch_norm(train, jnp.float32, "bn")(x)


def _embed_between(student_shape, teacher_shape) -> ICKDEmbed:
    if len(student_shape) != 4 or len(teacher_shape) != 4:
        raise ValueError(
            f"ickd's 1x1 connector maps [B, H, W, C] maps, got student {tuple(student_shape)} and teacher "
            f"{tuple(teacher_shape)}"
        )
    return ICKDEmbed(int(teacher_shape[-1]))


@register(
    "ickd", inputs="feature_maps",
    paper="Liu et al., *Exploring Inter-Channel Correlation for Diversity-Preserved Knowledge Distillation*, ICCV 2021",
    losses=("ickd",),
)
def ickd(
    *,
    student_features: str | tuple[str, ...] = "stage3",
    teacher_features: str | tuple[str, ...] | None = None,
    weight: Weight = 1.0,
    name: str = "ickd",
) -> Method:
    """ICKD-C (Liu, Wang, Jiang, Wang, Li & Zeng, ICCV 2021): :func:`jaxkd.losses.ickd` between the
    student's last feature map (``stage3``, the official ``feat[-2]``) through :class:`ICKDEmbed`
    (trainable 1x1 conv + BN to the teacher's channels) and the teacher's. Official CIFAR-100 recipe
    (``Cifar100/train_student.sh``): ``-a 0 -b 2.5``, i.e. ``ce + 2.5 * ickd``.
    """
    return feature_method(
        name, losses.ickd, student_features=student_features, teacher_features=teacher_features,
        connector=_embed_between, weight=weight,
    )
