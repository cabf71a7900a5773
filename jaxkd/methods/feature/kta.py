"""KTA distillation (the KT half of KTAAD) as a method: a student map through a trainable 3x3 adapter against
the teacher's map; :mod:`jaxkd.methods.feature.affinity` is the affinity half."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_positive
from jaxkd.methods.base import Method, Weight
from jaxkd.methods.feature.connectors import _torch_bias_init, _torch_kernel_init
from jaxkd.methods.features import feature_method
from jaxkd.methods.registry import register
from jaxkd.models.cifar_resnet import batch_norm

__all__ = ["Adapter", "kta"]


class Adapter(nn.Module):
    """torchdistill's ``Student4KTAAD`` adapters: a 3x3 convolution (stride 1, padding 1) to the teacher's
    channels, followed, for the feature adapter (``bn_relu``), by BatchNorm and ReLU."""

    channels: int
    bn_relu: bool = True

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.Conv(self.channels, (3, 3), padding=1, kernel_init=_torch_kernel_init,
                    bias_init=_torch_bias_init(9 * x.shape[-1]), name="conv")(jnp.asarray(x, jnp.float32))
        if not self.bn_relu:
            return x
        return nn.relu(batch_norm(train, jnp.float32, "bn")(x))


def _adapter(bn_relu: bool, method: str):
    def between(student_shape, teacher_shape) -> Adapter:
        if len(student_shape) != 4 or len(teacher_shape) != 4 or student_shape[1:3] != teacher_shape[1:3]:
            raise ValueError(
                f"{method}'s 3x3 adapter maps a [B, H, W, C] student map to a teacher map of the same H x W, got "
                f"student {tuple(student_shape)} and teacher {tuple(teacher_shape)}"
            )
        return Adapter(int(teacher_shape[-1]), bn_relu)

    return between


_PAPER = "He et al., *Knowledge Adaptation for Efficient Semantic Segmentation*, CVPR 2019"
_STATUS = ("supported (torchdistill's loss; the teacher's map itself is the target, not a first-stage "
           "paraphraser's encoding)")


@register("kta", inputs="feature_maps", paper=_PAPER, losses=("kta",), status=_STATUS)
def kta(
    *,
    student_features: str | tuple[str, ...] = "stage3",
    teacher_features: str | tuple[str, ...] | None = None,
    p: float = 1,
    q: float = 2,
    weight: Weight = 1.0,
    name: str = "kta",
) -> Method:
    """Knowledge translation and adaptation (:func:`jaxkd.losses.kta`): the student's map through the
    feature adapter (:class:`Adapter`: 3x3 conv, BN, ReLU, a method parameter) against the teacher's map,
    both flattened and ``q``-normalized. In the paper and torchdistill the target is the teacher's map
    encoded by a factor-transfer paraphraser trained beforehand (the "knowledge translator"); here it is
    the teacher's map itself (point ``teacher_features`` at a translated feature to get the original).
    torchdistill's COCO recipe: ``ce + 50 * kta + affinity``.
    """
    for n, v in (("p", p), ("q", q)):
        check_positive(n, v)
        if v < 1:
            raise ValueError(f"{n} must be a norm order >= 1, got {n}={v!r}")
    return feature_method(name, losses.kta, student_features=student_features, teacher_features=teacher_features,
                          connector=_adapter(True, name), weight=weight, p=p, q=q)
