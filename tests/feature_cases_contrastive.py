"""Contract cases for CRD, SimKD, ICKD, OFD and ReviewKD's losses (run by tests/test_feature_contract.py)."""

from __future__ import annotations

import numpy as np

from jaxkd import losses
from tests.feature_contract import FeatureCase


def _embeddings(rng):
    b, k, d = 6, 3, 4
    return (rng.normal(size=(b, d)), rng.normal(size=(b, d)), rng.normal(size=(b, k, d)) * 0.5,
            rng.normal(size=(b, k, d)) * 0.5)


def _maps(rng):
    return rng.normal(size=(6, 2, 2, 3)), rng.normal(size=(6, 2, 2, 3))


def _ofd_inputs(rng):
    s, t = _maps(rng)
    return s, t, -np.abs(rng.normal(size=(3,))) - 0.1


CASES = [
    FeatureCase(
        "crd", _embeddings,
        lambda es, et, rs, rt, **kw: losses.crd(es, et, rs, rt, z_student=3.0, z_teacher=5.0, num_examples=40,
                                                 temperature=0.5, **kw),
        batched=(0, 1, 2, 3), grad=(0, 1),
    ),
    FeatureCase(
        "crd_nce", lambda rng: (rng.uniform(0.05, 2.0, size=(6, 4)),),
        lambda x, **kw: losses.crd_nce(x, num_examples=30, **kw), batched=(0,), grad=(0,),
    ),
    FeatureCase("simkd", _maps, lambda s, t, **kw: losses.simkd(s, t, **kw)),
    FeatureCase("ickd", _maps, lambda s, t, **kw: losses.ickd(s, t, **kw)),
    FeatureCase("ofd", _ofd_inputs, lambda s, t, m, **kw: losses.ofd(s, t, m, **kw), batched=(0, 1), grad=(0,)),
    FeatureCase(
        "reviewkd",
        lambda rng: (rng.normal(size=(6, 5, 5, 2)), rng.normal(size=(6, 5, 5, 2)), rng.normal(size=(6, 1, 1, 3)),
                     rng.normal(size=(6, 1, 1, 3))),
        lambda s1, t1, s2, t2, **kw: losses.reviewkd([s1, s2], [t1, t2], **kw), batched=(0, 1, 2, 3), grad=(0, 2),
    ),
]
