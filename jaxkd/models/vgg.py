"""The CIFAR VGGs of knowledge-distillation benchmarks (RepDistiller / mdistiller ``vgg8`` … ``vgg19``).

Architecture: Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition"
(ICLR 2015), with batch normalization, as adapted to CIFAR by RepDistiller (Tian et al., "Contrastive
Representation Distillation", ICLR 2020, ``models/vgg.py``, the ``vgg*_bn`` builders its ``model_dict``
names ``vgg8`` … ``vgg19``; mdistiller reuses it). Conventions of that code, which this module follows:

* five blocks of 3x3 convolutions (padding 1, **with** a bias) each followed by BN + ReLU, except that the
  last layer of every block stops at its BatchNorm (the ReLU comes after, outside the block, which makes
  the BN output the ``preact`` feature); widths per block ``[[64], [128], [256], [512], [512]]`` repeated
  1/1/1/1/1 (vgg8), 1/1/2/2/2 (vgg11), 2/2/2/2/2 (vgg13), 2/2/3/3/3 (vgg16), 2/2/4/4/4 (vgg19) times;
* 2x2 stride-2 max pooling after blocks 0, 1 and 2; after block 3 only for 64-pixel-high inputs (so 32x32
  images reach blocks 3 and 4 at 4x4); global average pooling after block 4; one linear classifier
  from 512 features (the "FC layers are removed" of the official file);
* initialisation: convolutions ``N(0, 2 / (k*k*out_channels))`` with zero bias, BN ``gamma = 1, beta = 0``,
  the classifier ``N(0, 0.01)`` with zero bias.

At 100 classes: vgg8 3,965,028 parameters, vgg11 9,277,284, vgg13 9,462,180, vgg16 14,774,436, vgg19
20,086,692 (the counts of the official definitions).

Layout is NHWC. Features sown (flat names on the top module), RepDistiller's ``feat`` list: ``stem``
(``relu(block0)``, ``f0``), ``stage1`` … ``stage4`` (``relu(block1)`` … ``relu(block4)``, ``f1``–``f4``),
``stage1_preact`` … ``stage4_preact`` (the same before the ReLU: each block's last BatchNorm output, the
official ``preact=True`` features) and ``pooled`` (the ``[B, 512]`` embedding fed to the classifier, ``f5``).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxkd.models.base import check_image_input, classifier_logits
from jaxkd.models.cifar_resnet import batch_norm, conv_init
from jaxkd.models.conv import conv_general_dilated

#: name -> convolution widths per block, as RepDistiller's ``cfg`` ``S``, ``A``, ``B``, ``D``, ``E``.
VGGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def _max_pool(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2))


class VGG(nn.Module):
    """RepDistiller's CIFAR VGG with BatchNorm.

    Attributes:
      widths: convolution widths per block (five blocks).
      num_classes: classifier outputs.
      dtype: compute dtype (parameters stay float32); logits are returned in float32.
    """

    widths: Sequence[Sequence[int]]
    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        """Logits ``[batch, num_classes]`` (float32) of normalized float images ``x`` ``[B, H, W, C]``."""
        check_image_input(self, x, first_layer="block0_conv0")
        # The official forward reads the input height once: a 4th max pooling only for 64-pixel inputs.
        pool_after_block3 = x.shape[1] == 64
        for block, widths in enumerate(self.widths):
            for layer, width in enumerate(widths):
                if layer > 0:
                    x = nn.relu(x)
                x = nn.Conv(
                    width, (3, 3), padding=1, use_bias=True, kernel_init=conv_init, dtype=self.dtype,
                    name=f"block{block}_conv{layer}", conv_general_dilated=conv_general_dilated,
                )(x)
                x = batch_norm(train, self.dtype, f"block{block}_bn{layer}")(x)
            if block > 0:
                self.sow("intermediates", f"stage{block}_preact", x)
            x = nn.relu(x)
            self.sow("intermediates", "stem" if block == 0 else f"stage{block}", x)
            if block < 3 or (block == 3 and pool_after_block3):
                x = _max_pool(x)
        return classifier_logits(
            self, jnp.mean(x, axis=(1, 2)), self.num_classes, kernel_init=nn.initializers.normal(0.01)
        )


def vgg(name: str, *, num_classes: int, dtype: Any = jnp.float32) -> VGG:
    """Builds one of :data:`VGGS` by name (RepDistiller's ``vgg*_bn``)."""
    return VGG(widths=VGGS[name], num_classes=num_classes, dtype=dtype)
