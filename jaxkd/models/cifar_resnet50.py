"""The CIFAR ResNet50 of knowledge-distillation benchmarks (RepDistiller / mdistiller ``ResNet50``).

Architecture: He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), the 50-layer
bottleneck network, in the CIFAR version of RepDistiller (Tian et al., "Contrastive Representation
Distillation", ICLR 2020, ``models/resnetv2.py``; mdistiller reuses it). Conventions of that code, which
this module follows:

* the stem is a bias-free 3x3 stride-1 convolution to 64 channels + BN + ReLU (no 7x7 convolution, no max
  pooling), so 32x32 images give 32, 16, 8 and 4 pixel stage maps;
* four stages of 3, 4, 6, 3 bottleneck blocks (``relu(bn(conv1x1))``, ``relu(bn(conv3x3/s))``,
  ``bn(conv1x1)`` to ``4 x`` width, plus the shortcut, then ReLU) of widths 64, 128, 256, 512 at strides
  1, 2, 2, 2 (the stride on the 3x3 convolution); a block whose stride or width changes has a
  1x1 convolution + BN shortcut;
* global average pooling and a linear classifier from 2048 features;
* initialisation: convolutions Kaiming-normal (fan-out), BN ``gamma = 1, beta = 0``, the classifier
  PyTorch's default.

At 100 classes it has 23,705,252 parameters (the count of the official definition).

Layout is NHWC. Features sown (flat names on the top module), RepDistiller's ``feat`` list: ``stem``
(``f0``), ``stage1`` … ``stage4`` (each stage's output after its last ReLU, ``f1``–``f4``),
``stage1_preact`` … ``stage4_preact`` (the same before that ReLU, the official ``preact=True`` features)
and ``pooled`` (the ``[B, 2048]`` embedding fed to the classifier, ``f5``).

Registered as ``cifar_resnet50`` and under RepDistiller's name ``ResNet50`` (the lowercase ``resnet50`` is
torchvision's ImageNet network).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxkd.models.base import check_image_input, classifier_logits
from jaxkd.models.cifar_resnet import batch_norm, conv, dense_init, sown_conv_bn_relu

EXPANSION = 4


class Bottleneck(nn.Module):
    """``relu(bn(conv1x1(relu(bn(conv3x3/s(relu(bn(conv1x1(x)))))))) + shortcut(x))``, ``4 x features`` out."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        """``(output, preact)``: the block's output and the residual sum before its ReLU."""
        out = conv(self.features, 1, 1, self.dtype, "conv1")(x)
        out = nn.relu(batch_norm(train, self.dtype, "bn1")(out))
        out = conv(self.features, 3, self.strides, self.dtype, "conv2")(out)
        out = nn.relu(batch_norm(train, self.dtype, "bn2")(out))
        out = conv(EXPANSION * self.features, 1, 1, self.dtype, "conv3")(out)
        out = batch_norm(train, self.dtype, "bn3")(out)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != EXPANSION * self.features:
            shortcut = conv(EXPANSION * self.features, 1, self.strides, self.dtype, "shortcut_conv")(x)
            shortcut = batch_norm(train, self.dtype, "shortcut_bn")(shortcut)
        preact = out + shortcut
        return nn.relu(preact), preact


class CifarResNet50(nn.Module):
    """RepDistiller's CIFAR ``ResNet50`` (``resnetv2.py``).

    Attributes:
      num_classes: classifier outputs.
      num_blocks: bottleneck blocks per stage.
      dtype: compute dtype (parameters stay float32); logits are returned in float32.
    """

    num_classes: int
    num_blocks: Sequence[int] = (3, 4, 6, 3)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        """Logits ``[batch, num_classes]`` (float32) of normalized float images ``x`` ``[B, H, W, C]``."""
        check_image_input(self, x, first_layer="stem_conv")
        x = sown_conv_bn_relu(self, conv(64, 3, 1, self.dtype, "stem_conv"), x, train, bn="stem_bn", feature="stem")
        for stage, (width, n, strides) in enumerate(zip((64, 128, 256, 512), self.num_blocks, (1, 2, 2, 2)), start=1):
            for block in range(n):
                x, preact = Bottleneck(
                    width, strides if block == 0 else 1, dtype=self.dtype, name=f"stage{stage}_block{block}"
                )(x, train)
            self.sow("intermediates", f"stage{stage}_preact", preact)
            self.sow("intermediates", f"stage{stage}", x)
        return classifier_logits(self, jnp.mean(x, axis=(1, 2)), self.num_classes, kernel_init=dense_init)


def cifar_resnet50(*, num_classes: int, dtype: Any = jnp.float32) -> CifarResNet50:
    """RepDistiller's CIFAR ``ResNet50``: bottleneck blocks 3/4/6/3, widths 64/128/256/512 (x4 out)."""
    return CifarResNet50(num_classes=num_classes, dtype=dtype)
