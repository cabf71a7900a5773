"""Contract cases for the BYOT losses (task D: self-distillation through auxiliary heads)."""

from __future__ import annotations

import numpy as np

from jaxkd import losses
from tests.feature_contract import FeatureCase

_Y = np.array([0, 3, 1, 4, 2, 3], np.int32)  # fixed labels of the six examples (per-example losses)


def _inputs(rng):
    """Shallow logits [6, 2, 5], their embeddings [6, 2, 3], the deepest logits [6, 5] and embedding [6, 3]."""
    return (1.5 * rng.normal(size=(6, 2, 5)), rng.normal(size=(6, 2, 3)), 1.5 * rng.normal(size=(6, 5)),
            rng.normal(size=(6, 3)))


CASES = [
    FeatureCase(
        "byot", _inputs,
        lambda a, h, z, f, **kw: losses.byot(a, h, z, f, _Y, temperature=2.0, alpha=0.4, feature_weight=0.5, **kw),
        batched=(0, 1, 2, 3), grad=(0, 1, 2, 3),
    ),
    FeatureCase(
        "byot_terms", _inputs,
        lambda a, h, z, f, **kw: sum(losses.byot_terms(a, h, z, f, _Y, temperature=1.5, **kw)),
        batched=(0, 1, 2, 3), grad=(0, 1, 2, 3),
    ),
]
