"""The CIFAR ShuffleNets of knowledge-distillation benchmarks (RepDistiller / mdistiller ``ShuffleV1``,
``ShuffleV2``).

Architectures: Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile
Devices" (CVPR 2018) and Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture
Design" (ECCV 2018), in the CIFAR versions of RepDistiller (Tian et al., "Contrastive Representation
Distillation", ICLR 2020, ``models/ShuffleNetv1.py`` and ``models/ShuffleNetv2.py``; mdistiller reuses
them). Conventions of that code, which this module follows:

* the stem is a bias-free **1x1** convolution to 24 channels + BN + ReLU at full resolution (no 3x3
  stride-2 convolution, no max pooling), so 32x32 images give 16x16, 8x8 and 4x4 stage maps;
* ShuffleNetV1 (``groups = 3``, stage widths 240/480/960, 4/8/4 units): each unit is
  ``bn(gconv1x1(relu(bn(dw3x3(shuffle(relu(bn(gconv1x1(x)))))))))``, bottleneck width ``out / 4``; the
  first 1x1 of the very first unit (24 input channels) is not grouped and is followed by no shuffle; a
  stride-2 unit concatenates its output with ``avgpool3x3/2(x)`` (zero padding counted in the average) and
  produces ``width - in_channels`` channels itself; the other units add ``x``; ReLU after the
  concatenation / sum;
* ShuffleNetV2 (``net_size = 1``: stage widths 116/232/464, 3/7/3 basic units, head width 1024): each stage
  starts with a down-sampling unit (left: ``bn(dw3x3/2)`` then ``relu(bn(1x1))``; right: ``relu(bn(1x1))``,
  ``bn(dw3x3/2)``, ``relu(bn(1x1))``; both ``width / 2`` channels, concatenated and shuffled) followed by
  basic units (channel split in halves; the second half goes through ``relu(bn(1x1))``, ``bn(dw3x3)``,
  ``relu(bn(1x1))``; concatenated with the first half and shuffled in 2 groups); then a 1x1 head
  convolution + BN + ReLU;
* average pooling over the 4x4 map (global here for any size) and a linear classifier;
* initialisation: PyTorch's defaults (RepDistiller sets none): ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for
  convolution and linear weights (``fan_in`` per group); the classifier bias starts at 0.

At 100 classes ``ShuffleV1`` has 949,258 parameters and ``ShuffleV2`` 1,355,528 (the counts of
RepDistiller's definitions, "0.95M" and "1.36M").

Layout is NHWC; the channel shuffle ``[.., g, C/g] -> [.., C/g, g]`` is the NCHW one on the last axis.
Features sown (flat names on the top module), RepDistiller's ``feat`` list: ``stem`` (``f0``, after the
stem's ReLU), ``stage1`` / ``stage2`` / ``stage3`` (each stage's output, ``f1``–``f3``), ``stage1_preact`` …
``stage3_preact`` (the official ``preact=True`` features of each stage's last unit: for V1 the sum before
the ReLU; for V2 the concatenation of the untouched half with the branch's last BN output before its ReLU,
*not* channel-shuffled, exactly as the official code returns it) and ``pooled`` (the ``[B, C]`` embedding
fed to the classifier, ``f4``); V2 also ``prepool`` (the head convolution's ``relu(bn(conv1x1))`` map that
is pooled; not in the official list).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxkd.models.base import check_image_input, classifier_logits
from jaxkd.models.cifar_resnet import batch_norm, dense_init, sown_conv_bn_relu
from jaxkd.models.mobilenetv2 import grouped_conv


def channel_shuffle(x, groups: int):
    """``[..., C] -> [..., g, C/g] -> [..., C/g, g] -> [..., C]`` (ShuffleNet's shuffle, NHWC)."""
    *lead, c = x.shape
    return x.reshape(*lead, groups, c // groups).swapaxes(-1, -2).reshape(*lead, c)


def _conv(features, kernel, strides, groups, dtype, name):
    """A grouped convolution with PyTorch's default initialisation."""
    return grouped_conv(features, kernel, strides, groups, dtype, name, kernel_init=dense_init)


def _stem(module: nn.Module, x, train: bool):
    """Both ShuffleNets' stem, sown as ``stem``: ``relu(bn(conv1x1(x)))`` to 24 channels at full resolution
    (after :func:`jaxkd.models.base.check_image_input` on ``x``)."""
    check_image_input(module, x, first_layer="stem_conv")
    stem_conv = _conv(24, 1, 1, 1, module.dtype, "stem_conv")
    return sown_conv_bn_relu(module, stem_conv, x, train, bn="stem_bn", feature="stem")


class ShuffleV1Unit(nn.Module):
    """ShuffleNetV1 unit producing ``features`` channels itself (concatenated with ``avgpool(x)`` when
    ``strides == 2``)."""

    features: int
    strides: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        """``(output, preact)``: the unit's output and the same before its final ReLU."""
        mid = self.features // 4
        first_groups = 1 if x.shape[-1] == 24 else self.groups
        out = _conv(mid, 1, 1, first_groups, self.dtype, "conv1")(x)
        out = nn.relu(batch_norm(train, self.dtype, "bn1")(out))
        out = channel_shuffle(out, first_groups)
        out = _conv(mid, 3, self.strides, mid, self.dtype, "conv2")(out)
        out = nn.relu(batch_norm(train, self.dtype, "bn2")(out))
        out = _conv(self.features, 1, 1, self.groups, self.dtype, "conv3")(out)
        out = batch_norm(train, self.dtype, "bn3")(out)
        if self.strides == 2:
            shortcut = nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), count_include_pad=True)
            preact = jnp.concatenate([out, shortcut], axis=-1)
        else:
            preact = out + x
        return nn.relu(preact), preact


class ShuffleNetV1(nn.Module):
    """RepDistiller's CIFAR ShuffleNetV1.

    Attributes:
      num_classes: classifier outputs.
      out_planes: stage output widths.
      num_blocks: units per stage.
      groups: groups of the 1x1 convolutions.
      dtype: compute dtype (parameters stay float32); logits are returned in float32.
    """

    num_classes: int
    out_planes: Sequence[int] = (240, 480, 960)
    num_blocks: Sequence[int] = (4, 8, 4)
    groups: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        """Logits ``[batch, num_classes]`` (float32) of normalized float images ``x`` ``[B, H, W, C]``."""
        x = _stem(self, x, train)
        for stage, (width, n) in enumerate(zip(self.out_planes, self.num_blocks), start=1):
            for block in range(n):
                produced = width - x.shape[-1] if block == 0 else width
                x, preact = ShuffleV1Unit(
                    produced, 2 if block == 0 else 1, self.groups, dtype=self.dtype,
                    name=f"stage{stage}_block{block}",
                )(x, train)
            self.sow("intermediates", f"stage{stage}_preact", preact)
            self.sow("intermediates", f"stage{stage}", x)
        return classifier_logits(self, jnp.mean(x, axis=(1, 2)), self.num_classes, kernel_init=dense_init)


class ShuffleV2Down(nn.Module):
    """ShuffleNetV2 down-sampling unit (stride 2, both branches ``features / 2`` channels)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        mid = self.features // 2
        c = x.shape[-1]
        left = batch_norm(train, self.dtype, "bn1")(_conv(c, 3, 2, c, self.dtype, "conv1")(x))
        left = nn.relu(batch_norm(train, self.dtype, "bn2")(_conv(mid, 1, 1, 1, self.dtype, "conv2")(left)))
        right = nn.relu(batch_norm(train, self.dtype, "bn3")(_conv(mid, 1, 1, 1, self.dtype, "conv3")(x)))
        right = batch_norm(train, self.dtype, "bn4")(_conv(mid, 3, 2, mid, self.dtype, "conv4")(right))
        right = nn.relu(batch_norm(train, self.dtype, "bn5")(_conv(mid, 1, 1, 1, self.dtype, "conv5")(right)))
        return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleV2Basic(nn.Module):
    """ShuffleNetV2 basic unit (channel split in halves, stride 1)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        """``(output, preact)``: the shuffled output, and ``concat(x1, branch before its last ReLU)``
        unshuffled (RepDistiller's preact feature)."""
        c = x.shape[-1] // 2
        x1, x2 = x[..., :c], x[..., c:]
        out = nn.relu(batch_norm(train, self.dtype, "bn1")(_conv(c, 1, 1, 1, self.dtype, "conv1")(x2)))
        out = batch_norm(train, self.dtype, "bn2")(_conv(c, 3, 1, c, self.dtype, "conv2")(out))
        branch = batch_norm(train, self.dtype, "bn3")(_conv(c, 1, 1, 1, self.dtype, "conv3")(out))
        preact = jnp.concatenate([x1, branch], axis=-1)
        out = jnp.concatenate([x1, nn.relu(branch)], axis=-1)
        return channel_shuffle(out, 2), preact


class ShuffleNetV2(nn.Module):
    """RepDistiller's CIFAR ShuffleNetV2.

    Attributes:
      num_classes: classifier outputs.
      out_channels: stage widths and the head width (``net_size = 1``: ``(116, 232, 464, 1024)``).
      num_blocks: basic units per stage (after each stage's down-sampling unit).
      dtype: compute dtype (parameters stay float32); logits are returned in float32.
    """

    num_classes: int
    out_channels: Sequence[int] = (116, 232, 464, 1024)
    num_blocks: Sequence[int] = (3, 7, 3)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        """Logits ``[batch, num_classes]`` (float32) of normalized float images ``x`` ``[B, H, W, C]``."""
        x = _stem(self, x, train)
        *widths, head = self.out_channels
        for stage, (width, n) in enumerate(zip(widths, self.num_blocks), start=1):
            x = ShuffleV2Down(width, dtype=self.dtype, name=f"stage{stage}_down")(x, train)
            for block in range(n):
                x, preact = ShuffleV2Basic(dtype=self.dtype, name=f"stage{stage}_block{block}")(x, train)
            self.sow("intermediates", f"stage{stage}_preact", preact)
            self.sow("intermediates", f"stage{stage}", x)
        head_conv = _conv(head, 1, 1, 1, self.dtype, "head_conv")
        x = sown_conv_bn_relu(self, head_conv, x, train, bn="head_bn", feature="prepool")
        return classifier_logits(self, jnp.mean(x, axis=(1, 2)), self.num_classes, kernel_init=dense_init)


def shufflenetv1(*, num_classes: int, dtype: Any = jnp.float32) -> ShuffleNetV1:
    """RepDistiller's ``ShuffleV1``: widths 240/480/960, 4/8/4 units, 3 groups."""
    return ShuffleNetV1(num_classes=num_classes, dtype=dtype)


def shufflenetv2(*, num_classes: int, dtype: Any = jnp.float32) -> ShuffleNetV2:
    """RepDistiller's ``ShuffleV2`` (``net_size = 1``): widths 116/232/464, 3/7/3 basic units, head 1024."""
    return ShuffleNetV2(num_classes=num_classes, dtype=dtype)
