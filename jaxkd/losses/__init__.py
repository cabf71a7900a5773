"""Pure, jittable distillation objectives: functions of arrays, no state, no config objects.

Every loss computes in float32, treats ``-inf`` logits as excluded entries (zero mass, zero gradient),
takes explicit ``mask``/``weights``/``reduction`` arguments, and raises ``ValueError`` for bad
hyper-parameters or mismatched shapes. See :mod:`jaxkd.losses._core` for the shared conventions.
"""

from jaxkd.losses._core import log_softmax, reduce_loss
from jaxkd.losses.classification import cross_entropy, kd
from jaxkd.losses.divergences import kl_divergence, kl_per_example

__all__ = [
    "cross_entropy",
    "kd",
    "kl_divergence",
    "kl_per_example",
    "log_softmax",
    "reduce_loss",
]
