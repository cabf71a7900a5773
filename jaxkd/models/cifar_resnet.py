"""CIFAR ResNets as used by knowledge-distillation benchmarks (RepDistiller / mdistiller).

Architecture: He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), section 4.2
(the 6n+2-layer CIFAR networks: a 3x3 stem, three stages of ``n`` BasicBlocks at strides 1, 2, 2,
global average pooling and a linear classifier), with the conventions of RepDistiller
(Tian et al., "Contrastive Representation Distillation", ICLR 2020, ``models/resnet.py``), which
mdistiller reuses:

* the shortcut of a block whose stride or width changes is a 1x1 convolution + BatchNorm
  ("option B"), not the zero-padding identity ("option A") of the original paper;
* ``num_filters = [stem, stage1, stage2, stage3]`` is ``[16, 16, 32, 64]`` for resnet8 … resnet110
  and ``[32, 64, 128, 256]`` for the 4x-wide resnet8x4 / resnet32x4 (whose first stage therefore
  also starts with a 1x1 projection shortcut);
* convolutions have no bias and use Kaiming-normal (fan-out) initialisation.

Layout is NHWC. Features sown (flat names on the top module), RepDistiller's ``feat`` list:
``stem`` (stem output after its ReLU, ``f0``), ``stage1`` / ``stage2`` / ``stage3`` (each stage's output
after the final ReLU of its last block, ``f1``–``f3``; ``stage3`` is the map that is pooled),
``stage1_preact`` … ``stage3_preact`` (the same before that ReLU: the residual sum, RepDistiller's
``preact=True`` features, which OFD and ReviewKD distill) and ``pooled`` (the globally averaged ``[B, C]``
embedding fed to the classifier, ``f4``).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxkd.models.base import Array, check_image_input, classifier_logits
from jaxkd.models.conv import conv_general_dilated

# PyTorch ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``: N(0, 2 / (k*k*out_channels)).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default ``nn.Linear`` weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (biases start at 0,
# as RepDistiller's WRN sets them).
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv(features: int, kernel: int, strides: int, dtype: Any, name: str) -> nn.Conv:
    """A bias-free ``kernel x kernel`` convolution with Kaiming fan-out init.

    Pads ``kernel // 2`` on every side like PyTorch's ``padding=1`` (XLA's ``"SAME"`` would pad a
    stride-2 convolution asymmetrically and sample different pixels). The kernel gradient goes
    through :func:`jaxkd.models.conv.conv_general_dilated` (one GEMM on CPU instead of XLA's slow
    full-map convolution; identical results).
    """
    return nn.Conv(
        features, (kernel, kernel), strides=strides, padding=kernel // 2, use_bias=False,
        kernel_init=conv_init, dtype=dtype, name=name, conv_general_dilated=conv_general_dilated,
    )


def batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
    """BatchNorm matching PyTorch's defaults (momentum 0.1 there = 0.9 here, eps 1e-5)."""
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name
    )


def blocks_per_stage(depth: int, other_layers: int, what: str) -> int:
    """``n`` of a three-stage network of ``depth = 6n + other_layers`` weighted layers (two convolutions per
    block); ``ValueError`` naming ``what`` for another depth."""
    if (depth - other_layers) % 6 != 0:
        raise ValueError(f"{what} depth must be 6n+{other_layers}, got {depth}")
    return (depth - other_layers) // 6


def sown_conv_bn_relu(
    module: nn.Module, conv_layer: nn.Module, x: Array, train: bool, *, bn: str, feature: str
) -> Array:
    """``relu(batch_norm(conv_layer(x)))`` with the BatchNorm ``bn`` a child of ``module``, sown under
    ``feature`` (the CNNs' stem, and their head convolution's ``prepool`` map). Called inside ``module``'s
    compact ``__call__``."""
    x = conv_layer(x)
    x = nn.relu(batch_norm(train, module.dtype, bn)(x))
    module.sow("intermediates", feature, x)
    return x


class BasicBlock(nn.Module):
    """Post-activation residual block: ``relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x))``."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, *, return_preact: bool = False):
        """The block's output; with ``return_preact``, ``(output, the residual sum before the ReLU)``."""
        out = conv(self.features, 3, self.strides, self.dtype, "conv1")(x)
        out = nn.relu(batch_norm(train, self.dtype, "bn1")(out))
        out = conv(self.features, 3, 1, self.dtype, "conv2")(out)
        out = batch_norm(train, self.dtype, "bn2")(out)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = conv(self.features, 1, self.strides, self.dtype, "shortcut_conv")(x)
            shortcut = batch_norm(train, self.dtype, "shortcut_bn")(shortcut)
        preact = out + shortcut
        return (nn.relu(preact), preact) if return_preact else nn.relu(preact)


class CifarResNet(nn.Module):
    """RepDistiller's CIFAR ResNet of depth ``6n + 2`` (``n`` BasicBlocks per stage).

    Attributes:
      depth: total number of weighted layers, ``6n + 2`` (8, 14, 20, 32, 44, 56, 110, …).
      num_filters: widths ``[stem, stage1, stage2, stage3]``.
      num_classes: classifier outputs.
      dtype: compute dtype (parameters stay float32); logits are returned in float32.
    """

    depth: int
    num_filters: Sequence[int]
    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        """Logits ``[batch, num_classes]`` (float32) of normalized float images ``x`` ``[B, H, W, C]``."""
        n = blocks_per_stage(self.depth, 2, "CIFAR ResNet")
        check_image_input(self, x, first_layer="stem_conv")
        stem, *widths = self.num_filters

        stem_conv = conv(stem, 3, 1, self.dtype, "stem_conv")
        x = sown_conv_bn_relu(self, stem_conv, x, train, bn="stem_bn", feature="stem")
        for stage, (width, strides) in enumerate(zip(widths, (1, 2, 2)), start=1):
            for block in range(n):
                x = BasicBlock(
                    width, strides if block == 0 else 1, dtype=self.dtype,
                    name=f"stage{stage}_block{block}",
                )(x, train, return_preact=block == n - 1)
            x, preact = x
            self.sow("intermediates", f"stage{stage}_preact", preact)
            self.sow("intermediates", f"stage{stage}", x)
        return classifier_logits(self, jnp.mean(x, axis=(1, 2)), self.num_classes, kernel_init=dense_init)


_NARROW = (16, 16, 32, 64)
_WIDE_X4 = (32, 64, 128, 256)

#: name -> (depth, num_filters), as in RepDistiller's ``models/resnet.py``.
CIFAR_RESNETS: dict[str, tuple[int, tuple[int, ...]]] = {
    "resnet8": (8, _NARROW),
    "resnet14": (14, _NARROW),
    "resnet20": (20, _NARROW),
    "resnet32": (32, _NARROW),
    "resnet44": (44, _NARROW),
    "resnet56": (56, _NARROW),
    "resnet110": (110, _NARROW),
    "resnet8x4": (8, _WIDE_X4),
    "resnet32x4": (32, _WIDE_X4),
}


def cifar_resnet(name: str, *, num_classes: int, dtype: Any = jnp.float32) -> CifarResNet:
    """Builds one of :data:`CIFAR_RESNETS` by name."""
    depth, num_filters = CIFAR_RESNETS[name]
    return CifarResNet(depth=depth, num_filters=num_filters, num_classes=num_classes, dtype=dtype)
