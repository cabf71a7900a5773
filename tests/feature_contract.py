"""Contract cases for the feature, relational and ranking losses (tests/test_feature_contract.py runs them).

Every module ``tests/feature_cases_<group>.py`` defines ``CASES``, a list of :class:`FeatureCase`; the
contract test collects them all, so a group of losses adds its cases in its own file. Each case makes its
inputs from a NumPy generator and says which of them carry the batch axis and which are differentiated.
Values against references computed another way stay in each method's own test file; this checks what
every loss must keep whatever its formula:

* the full gradient with respect to every differentiated input equals float64 central finite
  differences, coordinate by coordinate (the losses compute in float64 when given float64);
* bfloat16 inputs give a float32 result equal to the float32 computation on the rounded inputs;
* jit gives the eager value;
* a NaN in a differentiated input makes the loss NaN (it is never silently dropped);
* the mask: for a per-example loss, ``reduction="none"`` times the mask averages to the masked mean and
  masked examples get zero gradients; for a relational loss, the masked value equals the loss of the
  unmasked examples alone (what a sharded global batch with padding must give).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class FeatureCase:
    """How to exercise one feature loss.

    Attributes:
      name: the ``jaxkd.losses`` function the case covers (several cases may cover one function).
      make: ``rng -> tuple of float64 NumPy arrays``, the loss's positional inputs (small: finite
        differences run coordinate by coordinate).
      fn: ``(*inputs, **kw) -> value``: calls the loss with fixed non-default hyper-parameters and passes
        ``kw`` (``mask``, ``reduction``) through.
      batched: indices of the inputs whose first axis is the batch (sliced by the relational mask test).
      grad: indices of the inputs to differentiate.
      relational: the loss couples the examples (made public by ``relational_loss``): a scalar, mask =
        the subset's loss. Otherwise per-example (``per_example_loss``).
      min_examples: the fewest examples the relational loss is defined for (the mask test keeps more).
      id: the pytest id when several cases cover one function (default ``name``).
    """

    name: str
    make: Callable[[np.random.Generator], tuple]
    fn: Callable
    batched: tuple[int, ...] = (0, 1)
    grad: tuple[int, ...] = (0,)
    relational: bool = False
    min_examples: int = 2
    id: str | None = None

    @property
    def test_id(self) -> str:
        return self.id or self.name
