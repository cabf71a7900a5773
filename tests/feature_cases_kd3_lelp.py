"""Contract cases for the KD³ and LELP losses."""

from __future__ import annotations

import numpy as np

from jaxkd import losses
from tests.feature_contract import FeatureCase

# LELP projections [K=3, S=2, D+1=5], fixed (not an input of the finite-difference checks).
_PROJ = np.random.default_rng(11).normal(size=(3, 2, 5))


def _kd3_inputs(rng):
    return 1.5 * rng.normal(size=(6, 5)), 1.5 * rng.normal(size=(6, 5)), rng.normal(size=(6, 4)), rng.normal(size=(6, 4))


CASES = [
    FeatureCase(
        "kd3", _kd3_inputs,
        lambda zs, zt, s, t, **kw: losses.kd3(zs, zt, s, t, temperature=2.0, feature_weight=0.7, **kw),
        batched=(0, 1, 2, 3), grad=(0, 1, 2, 3),
    ),
    FeatureCase(
        "kd3_terms", _kd3_inputs,
        lambda zs, zt, s, t, **kw: sum(losses.kd3_terms(zs, zt, s, t, temperature=3.0, **kw)),
        batched=(0, 1, 2, 3), grad=(0, 2, 1, 3),
    ),
    FeatureCase(
        "kd3_instance_alignment",
        lambda rng: (rng.normal(size=(6, 4)), rng.normal(size=(6, 4))),
        lambda s, t, **kw: losses.kd3_instance_alignment(s, t, temperature=0.5, **kw),
        batched=(0, 1), grad=(0, 1), relational=True,
    ),
    FeatureCase(
        "lelp",
        lambda rng: (1.5 * rng.normal(size=(6, 6)), 1.5 * rng.normal(size=(6, 3)), rng.normal(size=(6, 4))),
        lambda zs, zt, f, **kw: losses.lelp(zs, zt, f, _PROJ, temperature=2.0, subclass_temperature=0.5, **kw),
        batched=(0, 1, 2), grad=(0, 1, 2),
    ),
]
