"""torchvision's ImageNet ResNets (``resnet18``, ``resnet34``, ``resnet50``) in NHWC Flax.

Architecture: He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), Table 1, as defined
by torchvision (``torchvision/models/resnet.py``, github.com/pytorch/vision), whose pretrained weights
(``ResNet34_Weights.IMAGENET1K_V1`` …) are the teachers of torchdistill's ImageNet table:

* stem: 7x7 stride-2 convolution (64 channels, padding 3) + BN + ReLU, then a 3x3 stride-2 max-pool with
  padding 1 — padded with ``-inf`` as PyTorch's ``MaxPool2d`` does, so a border window takes the
  maximum of its real pixels only;
* four stages ``layer1`` … ``layer4`` of widths 64, 128, 256, 512 at strides 1, 2, 2, 2, with
  ``[2, 2, 2, 2]`` BasicBlocks (resnet18), ``[3, 4, 6, 3]`` BasicBlocks (resnet34) or ``[3, 4, 6, 3]``
  Bottlenecks of expansion 4 (resnet50);
* the Bottleneck is "ResNet V1.5": the stride sits on its 3x3 convolution (``conv2``), not on the first
  1x1 as in the paper and Caffe's ResNet V1;
* a block whose stride or width changes has a ``downsample`` shortcut: 1x1 convolution (with the stride)
  + BN; all convolutions are bias-free with PyTorch's symmetric padding ``kernel // 2``;
* global average pooling and a linear classifier ``fc`` (with bias);
* initialisation: convolutions Kaiming-normal fan-out, BN ``gamma = 1, beta = 0``, ``fc`` PyTorch's
  default ``Linear`` init (``zero_init_residual=False``, torchvision's default).

Parameter counts at 1000 classes equal torchvision's: resnet18 11,689,512; resnet34 21,797,672;
resnet50 25,557,032. Variable names mirror torchvision's module names (``conv1``, ``bn1``,
``layer2_0/downsample_conv`` for ``layer2.0.downsample.0`` …) so the key map of
:mod:`jaxkd.models.torch_imagenet` is a renaming.

Layout is NHWC. Features sown (flat names on the top module, the CIFAR zoo's naming so the feature
methods' defaults apply): ``stem`` (the max-pool's output, the map ``layer1`` reads), ``stage1`` …
``stage4`` (the outputs of ``layer1`` … ``layer4``, after the last block's final ReLU),
``stage1_preact`` … ``stage4_preact`` (the same before that ReLU: the last block's residual sum — what a
forward hook on the input of torchvision's ``layerN[-1].relu`` records, the features torchdistill's
ReviewKD configuration distills) and ``pooled`` (the ``[B, C]`` embedding fed to ``fc``).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models.base import check_image_input, classifier_logits
from jaxkd.models.cifar_resnet import batch_norm, conv, dense_init


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32

    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool):
        """``(output, the residual sum before the final ReLU)``."""
        out = conv(self.features, 3, self.strides, self.dtype, "conv1")(x)
        out = nn.relu(batch_norm(train, self.dtype, "bn1")(out))
        out = conv(self.features, 3, 1, self.dtype, "conv2")(out)
        out = batch_norm(train, self.dtype, "bn2")(out)
        preact = out + _shortcut(self, x, train)
        return nn.relu(preact), preact


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (V1.5, stride on the 3x3):
    ``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x))``, ``4 * features`` wide."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool):
        """``(output, the residual sum before the final ReLU)``."""
        out = conv(self.features, 1, 1, self.dtype, "conv1")(x)
        out = nn.relu(batch_norm(train, self.dtype, "bn1")(out))
        out = conv(self.features, 3, self.strides, self.dtype, "conv2")(out)
        out = nn.relu(batch_norm(train, self.dtype, "bn2")(out))
        out = conv(self.features * self.expansion, 1, 1, self.dtype, "conv3")(out)
        out = batch_norm(train, self.dtype, "bn3")(out)
        preact = out + _shortcut(self, x, train)
        return nn.relu(preact), preact


def _shortcut(block: nn.Module, x, train: bool):
    """``x``, or torchvision's ``downsample`` (1x1 conv with the block's stride + BN) when the block changes
    the stride or the width. Called inside ``block``'s compact ``__call__``."""
    width = block.features * block.expansion
    if block.strides == 1 and x.shape[-1] == width:
        return x
    x = conv(width, 1, block.strides, block.dtype, "downsample_conv")(x)
    return batch_norm(train, block.dtype, "downsample_bn")(x)


class ImageNetResNet(nn.Module):
    """torchvision's ``ResNet`` (groups 1, width 64, no dilation).

    Attributes:
      block: ``"basic"`` or ``"bottleneck"``.
      layers: blocks per stage (four entries).
      num_classes: classifier outputs.
      dtype: compute dtype (parameters stay float32); logits are returned in float32.
    """

    block: str
    layers: Sequence[int]
    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        """Logits ``[batch, num_classes]`` (float32) of normalized float images ``x`` ``[B, H, W, 3]``."""
        check_image_input(self, x, first_layer="conv1")
        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
        x = conv(64, 7, 2, self.dtype, "conv1")(x)
        x = nn.relu(batch_norm(train, self.dtype, "bn1")(x))
        # nn.max_pool pads with -inf (its reduce_window starts from -inf), as PyTorch's MaxPool2d does.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        self.sow("intermediates", "stem", x)
        for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), self.layers), start=1):
            for i in range(blocks):
                strides = 2 if stage > 1 and i == 0 else 1
                x, preact = block_cls(width, strides, dtype=self.dtype, name=f"layer{stage}_{i}")(x, train)
            self.sow("intermediates", f"stage{stage}_preact", preact)
            self.sow("intermediates", f"stage{stage}", x)
        return classifier_logits(self, jnp.mean(x, axis=(1, 2)), self.num_classes, kernel_init=dense_init,
                                 bias_init=_fc_bias_init(x.shape[-1]))


def _fc_bias_init(fan_in: int):
    """PyTorch's default ``Linear`` bias init, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / fan_in**0.5

    def init(rng, shape, dtype=jnp.float32):
        return jax.random.uniform(rng, shape, dtype, -bound, bound)

    return init


#: name -> (block, blocks per stage), as torchvision's ``resnet18`` / ``resnet34`` / ``resnet50``.
IMAGENET_RESNETS: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


def imagenet_resnet(name: str, *, num_classes: int, dtype: Any = jnp.float32) -> ImageNetResNet:
    """Builds one of :data:`IMAGENET_RESNETS` by torchvision's name."""
    block, layers = IMAGENET_RESNETS[name]
    return ImageNetResNet(block=block, layers=layers, num_classes=num_classes, dtype=dtype)
