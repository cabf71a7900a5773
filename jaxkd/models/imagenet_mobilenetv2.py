"""torchvision's ImageNet MobileNetV2 (``mobilenet_v2``) in NHWC Flax.

Architecture: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks" (CVPR 2018), Table 2,
as defined by torchvision (``torchvision/models/mobilenetv2.py``, github.com/pytorch/vision), width 1.0:

* stem ``features.0``: 3x3 stride-2 convolution to 32 channels + BN + ReLU6;
* seventeen inverted residual blocks ``features.1`` … ``features.17`` in seven groups ``(t, c, n, s)`` =
  ``(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
  (6, 320, 1, 1)``: a 1x1 expansion to ``t x`` width + BN + ReLU6 (absent when ``t = 1``, unlike
  RepDistiller's CIFAR ``mobile_half``), a 3x3 depthwise convolution (the group's stride on its first
  block) + BN + ReLU6, a linear 1x1 projection + BN, and the identity added when the stride is 1 and the
  width is kept;
* head ``features.18``: 1x1 convolution to 1280 channels + BN + ReLU6, global average pooling, dropout
  (p = 0.2, train mode only) and the linear classifier ``classifier.1``;
* convolutions bias-free, padded ``kernel // 2`` on every side like PyTorch; initialisation Kaiming-normal
  fan-out (depthwise included), BN ``gamma = 1, beta = 0``, classifier ``N(0, 0.01)`` with zero bias.

3,504,872 parameters at 1000 classes, torchvision's count. Variable names: ``stem_conv`` / ``stem_bn``,
``block{i}`` for ``features.{i}`` (children ``expand_conv``, ``expand_bn``, ``depthwise_conv``,
``depthwise_bn``, ``project_conv``, ``project_bn``), ``head_conv`` / ``head_bn`` and ``fc``
(see :mod:`jaxkd.models.torch_imagenet` for the key map).

Layout is NHWC. Features sown (the CIFAR ``mobilenetv2``'s names): ``stem`` (the stem's output),
``stage1`` … ``stage4`` (the outputs of the last block at each resolution: groups 2, 3, 5 and 7, i.e.
``features.3``, ``features.6``, ``features.13`` and ``features.17``, at strides 4, 8, 16 and 32; linear
bottleneck outputs, never passed through an activation), ``stage1_preact`` … ``stage4_preact`` (the same
arrays, as in the CIFAR model), ``prepool`` (the head's ReLU6 map that is pooled) and ``pooled``
(the ``[B, 1280]`` embedding fed to the classifier, before dropout).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxkd.checks import check_number
from jaxkd.models.base import INTERMEDIATES, check_image_input
from jaxkd.models.cifar_resnet import batch_norm, conv_init
from jaxkd.models.mobilenetv2 import grouped_conv

#: ``(expansion t, width c, blocks n, first stride s)`` per block group (torchvision's setting).
_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
#: Block groups (0-based) whose output is a ``stage`` feature: the last group at each resolution.
_FEATURE_GROUPS = (1, 2, 4, 6)
_LAST_CHANNEL = 1280


def _conv_bn_relu6(module: nn.Module, x, features: int, kernel: int, strides: int, groups: int, train: bool,
                   conv_name: str, bn_name: str):
    """torchvision's ``Conv2dNormActivation`` with ReLU6, as children of ``module`` (inside its compact call)."""
    x = grouped_conv(features, kernel, strides, groups, module.dtype, conv_name, kernel_init=conv_init)(x)
    return nn.relu6(batch_norm(train, module.dtype, bn_name)(x))


class InvertedResidual(nn.Module):
    """torchvision's ``InvertedResidual``: ``[pw + BN + ReLU6] -> dw3x3 + BN + ReLU6 -> pw-linear + BN``
    (+ ``x`` when stride 1 and the width is kept); the expansion is absent when ``expansion == 1``."""

    features: int
    strides: int
    expansion: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        hidden = int(round(x.shape[-1] * self.expansion))
        out = x
        if self.expansion != 1:
            out = _conv_bn_relu6(self, out, hidden, 1, 1, 1, train, "expand_conv", "expand_bn")
        out = _conv_bn_relu6(self, out, hidden, 3, self.strides, hidden, train, "depthwise_conv", "depthwise_bn")
        out = grouped_conv(self.features, 1, 1, 1, self.dtype, "project_conv")(out)
        out = batch_norm(train, self.dtype, "project_bn")(out)
        if self.strides == 1 and x.shape[-1] == self.features:
            out = x + out
        return out


class ImageNetMobileNetV2(nn.Module):
    """torchvision's ``MobileNetV2`` at width 1.0.

    Attributes:
      num_classes: classifier outputs.
      dropout_rate: dropout before the classifier in train mode (torchvision: 0.2).
      dtype: compute dtype (parameters stay float32); logits are returned in float32.
    """

    num_classes: int
    dropout_rate: float = 0.2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        """Logits ``[batch, num_classes]`` (float32) of normalized float images ``x`` ``[B, H, W, 3]``."""
        check_image_input(self, x, first_layer="stem_conv")
        x = _conv_bn_relu6(self, x, 32, 3, 2, 1, train, "stem_conv", "stem_bn")
        self.sow(INTERMEDIATES, "stem", x)
        index, stage = 1, 0  # torchvision's features.{index}
        for group, (t, c, n, s) in enumerate(_SETTING):
            for i in range(n):
                x = InvertedResidual(c, s if i == 0 else 1, t, dtype=self.dtype, name=f"block{index}")(x, train)
                index += 1
            if group in _FEATURE_GROUPS:
                stage += 1
                self.sow(INTERMEDIATES, f"stage{stage}", x)
                self.sow(INTERMEDIATES, f"stage{stage}_preact", x)
        x = _conv_bn_relu6(self, x, _LAST_CHANNEL, 1, 1, 1, train, "head_conv", "head_bn")
        self.sow(INTERMEDIATES, "prepool", x)
        pooled = jnp.mean(x, axis=(1, 2))
        self.sow(INTERMEDIATES, "pooled", pooled)
        pooled = nn.Dropout(self.dropout_rate, deterministic=not train)(pooled)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.normal(0.01),
                          name="fc")(pooled)
        return logits.astype(jnp.float32)


def imagenet_mobilenetv2(*, num_classes: int, dtype: Any = jnp.float32, dropout_rate: float = 0.2) -> ImageNetMobileNetV2:
    """torchvision's ``mobilenet_v2``; ``dropout_rate`` must lie in ``[0, 1)``."""
    check_number("dropout_rate", dropout_rate, low=0.0, high=1.0, high_open=True)
    return ImageNetMobileNetV2(num_classes=num_classes, dropout_rate=dropout_rate, dtype=dtype)
