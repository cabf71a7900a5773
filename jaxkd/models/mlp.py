"""A plain multilayer perceptron for tiny experiments (flattens its input; Dense + ReLU layers).

Features sown (flat names on the top module): ``hidden1`` … ``hiddenN`` (post-ReLU activations of
each hidden layer) and ``pooled`` (the classifier's input: the last hidden activation, or the
flattened input when there are no hidden layers).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxkd.models.base import check_image_input, classifier_logits


class MLP(nn.Module):
    """``Dense(num_classes) o [ReLU o Dense(h) for h in hidden_sizes] o flatten``.

    Attributes:
      num_classes: classifier outputs.
      hidden_sizes: width of each hidden layer, in order.
      dtype: compute dtype (parameters stay float32); logits are returned in float32.
    """

    num_classes: int
    hidden_sizes: Sequence[int] = (256, 256)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        """Logits ``[batch, num_classes]`` (float32) of float inputs ``x`` ``[batch, ...]`` (flattened)."""
        del train  # no train/eval-dependent layers
        check_image_input(self, x, first_layer="dense1" if self.hidden_sizes else "fc", flatten=True)
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden_sizes, start=1):
            x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"dense{i}")(x))
            self.sow("intermediates", f"hidden{i}", x)
        return classifier_logits(self, x, self.num_classes)
