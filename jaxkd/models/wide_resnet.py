"""Wide ResNets for CIFAR as used by knowledge-distillation benchmarks (RepDistiller / mdistiller).

Architecture: Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016): WRN-d-k has a 3x3
stem convolution to 16 channels, three stages of ``n = (d - 4) / 6`` pre-activation BasicBlocks of
widths ``16k, 32k, 64k`` at strides 1, 2, 2, then BN + ReLU, global average pooling and a linear
classifier. Conventions follow RepDistiller (Tian et al., ICLR 2020, ``models/wrn.py``):

* a block whose width or stride changes pre-activates its input once and feeds the activation to
  both the residual branch and a bias-free 1x1 convolution shortcut; other blocks keep the raw
  input as the identity shortcut;
* optional dropout between the two convolutions of a block (rate 0 by default);
* convolutions have no bias and use Kaiming-normal (fan-out) initialisation.

Layout is NHWC. Features sown (flat names on the top module), as RepDistiller's ``feat`` list: ``stem``
(the stem convolution's output, ``f0``), ``stage1`` / ``stage2`` / ``stage3`` (each stage's raw output,
the residual sum, ``f1``–``f3``), ``stage1_preact`` … ``stage3_preact`` (the same normalized by the
BatchNorm that the network applies to it next, the next stage's first block's or the final one, before
its ReLU: RepDistiller's ``preact=True`` features), ``prepool`` (``relu(bn(stage3))``, the map that is
pooled) and ``pooled`` (the ``[B, C]`` embedding fed to the classifier, ``f4``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxkd.checks import check_number
from jaxkd.models.base import check_image_input, classifier_logits
from jaxkd.models.cifar_resnet import batch_norm, blocks_per_stage, conv, dense_init


class PreActBlock(nn.Module):
    """``conv3x3(dropout(relu(bn(conv3x3(relu(bn(x))))))) + shortcut``."""

    features: int
    strides: int = 1
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, *, return_input_bn: bool = False):
        """The block's output; with ``return_input_bn``, ``(output, bn1(x))``: the previous stage's output
        as this block normalizes it, before the ReLU (the pre-activation feature)."""
        normed = batch_norm(train, self.dtype, "bn1")(x)
        act = nn.relu(normed)
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = conv(self.features, 1, self.strides, self.dtype, "shortcut_conv")(act)
        else:
            shortcut = x
        out = conv(self.features, 3, self.strides, self.dtype, "conv1")(act)
        out = nn.relu(batch_norm(train, self.dtype, "bn2")(out))
        out = nn.Dropout(self.dropout_rate, deterministic=not train)(out)
        out = conv(self.features, 3, 1, self.dtype, "conv2")(out)
        return (out + shortcut, normed) if return_input_bn else out + shortcut


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` (``depth = 6n + 4``).

    Attributes:
      depth: total number of weighted layers, ``6n + 4`` (16, 28, 40, …).
      widen_factor: ``k``; stage widths are ``16k, 32k, 64k``.
      num_classes: classifier outputs.
      dropout_rate: dropout inside each block (needs a ``"dropout"`` rng when > 0 and training).
      dtype: compute dtype (parameters stay float32); logits are returned in float32.
    """

    depth: int
    widen_factor: int
    num_classes: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        """Logits ``[batch, num_classes]`` (float32) of normalized float images ``x`` ``[B, H, W, C]``."""
        n = blocks_per_stage(self.depth, 4, "WRN")
        check_image_input(self, x, first_layer="stem_conv")
        widths = (16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor)

        x = conv(16, 3, 1, self.dtype, "stem_conv")(x)
        self.sow("intermediates", "stem", x)
        for stage, (width, strides) in enumerate(zip(widths, (1, 2, 2)), start=1):
            if stage > 1:
                self.sow("intermediates", f"stage{stage - 1}", x)
            for block in range(n):
                x = PreActBlock(
                    width, strides if block == 0 else 1, self.dropout_rate, dtype=self.dtype,
                    name=f"stage{stage}_block{block}",
                )(x, train, return_input_bn=stage > 1 and block == 0)
                if stage > 1 and block == 0:
                    # The previous stage's output as this block normalizes and activates it.
                    x, normed = x
                    self.sow("intermediates", f"stage{stage - 1}_preact", normed)
        self.sow("intermediates", "stage3", x)
        normed = batch_norm(train, self.dtype, "final_bn")(x)
        x = nn.relu(normed)
        self.sow("intermediates", "stage3_preact", normed)
        self.sow("intermediates", "prepool", x)
        return classifier_logits(self, jnp.mean(x, axis=(1, 2)), self.num_classes, kernel_init=dense_init)


#: name -> (depth, widen_factor), as in RepDistiller's ``models/wrn.py``.
WIDE_RESNETS: dict[str, tuple[int, int]] = {
    "wrn_16_1": (16, 1),
    "wrn_16_2": (16, 2),
    "wrn_40_1": (40, 1),
    "wrn_40_2": (40, 2),
}


def wide_resnet(
    name: str, *, num_classes: int, dtype: Any = jnp.float32, dropout_rate: float = 0.0
) -> WideResNet:
    """Builds one of :data:`WIDE_RESNETS` by name.

    Raises:
      ValueError: ``dropout_rate`` is not a number in ``[0, 1)``.
    """
    check_number("dropout_rate", dropout_rate, low=0.0, high=1.0, high_open=True)
    depth, widen_factor = WIDE_RESNETS[name]
    return WideResNet(
        depth=depth, widen_factor=widen_factor, num_classes=num_classes,
        dropout_rate=dropout_rate, dtype=dtype,
    )
