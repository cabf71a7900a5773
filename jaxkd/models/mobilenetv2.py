"""The CIFAR MobileNetV2 of knowledge-distillation benchmarks (RepDistiller / mdistiller ``mobile_half``).

Architecture: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks" (CVPR 2018):
inverted residual blocks (1x1 expansion by ``T`` + BN + ReLU, 3x3 depthwise + BN + ReLU, linear 1x1
projection + BN, identity shortcut when stride 1 and the width is kept), as adapted to CIFAR by
Jin et al., "Knowledge Distillation via Route Constrained Optimization" (ICCV 2019), and used by
RepDistiller (Tian et al., "Contrastive Representation Distillation", ICLR 2020, ``models/mobilenetv2.py``;
mdistiller reuses it). Conventions of that code, which this module follows:

* the stem is a 3x3 stride-2 convolution to ``int(32 * width_mult)`` channels + BN + ReLU;
* seven block groups ``(t, c, n, s)`` = ``(1, 16, 1, 1), (T, 24, 2, 1), (T, 32, 3, 2), (T, 64, 4, 2),
  (T, 96, 3, 1), (T, 160, 3, 2), (T, 320, 1, 1)`` with widths ``int(c * width_mult)`` (the ImageNet
  model's second stride 2 is 1 here, so 32x32 images end on 2x2 maps);
* unlike the paper, the ``t = 1`` block also has its 1x1 expansion convolution (to ``1x`` width);
* the head is a 1x1 convolution to 1280 channels (``int(1280 * width_mult)`` only when
  ``width_mult > 1``) + BN + ReLU, average pooling (global on 32x32 inputs; global here for any size)
  and a linear classifier (no dropout);
* initialisation: convolutions ``N(0, 2 / (k*k*out_channels))`` (fan-out, depthwise included),
  BN ``gamma = 1, beta = 0``, the classifier ``N(0, 0.01)`` with zero bias.

``mobile_half`` (``mobilenetv2`` here) is ``T = 6, width_mult = 0.5``: 812,836 parameters at 100 classes
(the count of RepDistiller's definition, "0.81M").

Layout is NHWC. Features sown (flat names on the top module), RepDistiller's ``feat`` list: ``stem`` (the
stem's output after its ReLU, ``f0``), ``stage1`` … ``stage4`` (the outputs of block groups 2, 3, 5 and 7,
``f1``–``f4``: linear-bottleneck outputs, never passed through a ReLU), ``stage1_preact`` … ``stage4_preact``
(the same arrays: the official model returns the same features when asked for ``preact=True``, as its
block outputs already are pre-activation; OFD's ``get_bn_before_relu`` taps the last BatchNorm of those
blocks), ``prepool`` (the head convolution's ``relu(bn(conv1x1))`` map that is pooled; not in the
official list) and ``pooled`` (the ``[B, C]`` embedding fed to the classifier, ``f5``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxkd.models.base import check_image_input, classifier_logits
from jaxkd.models.cifar_resnet import batch_norm, conv_init, sown_conv_bn_relu
from jaxkd.models.conv import conv_general_dilated

#: ``(expansion t, base width c, blocks n, first stride s)`` per block group; ``None`` means ``T``.
_SETTING = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)
#: Block groups (0-based) whose output is a feature: RepDistiller's ``f1``–``f4``.
_FEATURE_GROUPS = (1, 2, 4, 6)


def grouped_conv(
    features: int, kernel: int, strides: int, groups: int, dtype: Any, name: str,
    kernel_init: Any = conv_init,
) -> nn.Conv:
    """A bias-free ``kernel x kernel`` convolution in ``groups`` groups, padded ``kernel // 2`` on every side
    like PyTorch (``groups = channels`` is a depthwise convolution)."""
    return nn.Conv(
        features, (kernel, kernel), strides=strides, padding=kernel // 2, use_bias=False,
        feature_group_count=groups, kernel_init=kernel_init, dtype=dtype, name=name,
        conv_general_dilated=conv_general_dilated,
    )


class InvertedResidual(nn.Module):
    """``bn(pw(relu(bn(dw3x3(relu(bn(pw(x))))))))`` (+ ``x`` when stride 1 and the width is kept)."""

    features: int
    strides: int
    expansion: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        hidden = x.shape[-1] * self.expansion
        out = grouped_conv(hidden, 1, 1, 1, self.dtype, "expand_conv")(x)
        out = nn.relu(batch_norm(train, self.dtype, "expand_bn")(out))
        out = grouped_conv(hidden, 3, self.strides, hidden, self.dtype, "depthwise_conv")(out)
        out = nn.relu(batch_norm(train, self.dtype, "depthwise_bn")(out))
        out = grouped_conv(self.features, 1, 1, 1, self.dtype, "project_conv")(out)
        out = batch_norm(train, self.dtype, "project_bn")(out)
        if self.strides == 1 and x.shape[-1] == self.features:
            out = x + out
        return out


class MobileNetV2(nn.Module):
    """RepDistiller's CIFAR MobileNetV2.

    Attributes:
      num_classes: classifier outputs.
      expansion: ``T``, the expansion ratio of every block group but the first.
      width_mult: width multiplier of the stem and the blocks.
      dtype: compute dtype (parameters stay float32); logits are returned in float32.
    """

    num_classes: int
    expansion: int = 6
    width_mult: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        """Logits ``[batch, num_classes]`` (float32) of normalized float images ``x`` ``[B, H, W, C]``."""
        check_image_input(self, x, first_layer="stem_conv")
        stem_conv = grouped_conv(int(32 * self.width_mult), 3, 2, 1, self.dtype, "stem_conv")
        x = sown_conv_bn_relu(self, stem_conv, x, train, bn="stem_bn", feature="stem")
        stage = 0
        for group, (t, c, n, s) in enumerate(_SETTING):
            width = int(c * self.width_mult)
            for block in range(n):
                x = InvertedResidual(
                    width, s if block == 0 else 1, self.expansion if t is None else t,
                    dtype=self.dtype, name=f"group{group}_block{block}",
                )(x, train)
            if group in _FEATURE_GROUPS:
                stage += 1
                self.sow("intermediates", f"stage{stage}", x)
                self.sow("intermediates", f"stage{stage}_preact", x)
        last = int(1280 * self.width_mult) if self.width_mult > 1.0 else 1280
        head_conv = grouped_conv(last, 1, 1, 1, self.dtype, "head_conv")
        x = sown_conv_bn_relu(self, head_conv, x, train, bn="head_bn", feature="prepool")
        return classifier_logits(
            self, jnp.mean(x, axis=(1, 2)), self.num_classes, kernel_init=nn.initializers.normal(0.01)
        )


def mobilenetv2(*, num_classes: int, dtype: Any = jnp.float32) -> MobileNetV2:
    """RepDistiller's ``mobile_half``: ``T = 6``, ``width_mult = 0.5``."""
    return MobileNetV2(num_classes=num_classes, expansion=6, width_mult=0.5, dtype=dtype)
