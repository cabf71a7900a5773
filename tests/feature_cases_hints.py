"""Contract cases for the hint/attention losses: fitnets, at, nst, fsp, kdsvd, pkt
(tests/test_feature_contract.py runs them)."""

from __future__ import annotations

from jaxkd import losses

from tests.feature_contract import FeatureCase


def _pair(shape_s, shape_t, noise=0.5):
    """A student map near the teacher's (same shape) or an independent one (different shapes)."""
    def make(rng):
        t = rng.normal(size=shape_t)
        s = t + noise * rng.normal(size=shape_t) if shape_s == shape_t else rng.normal(size=shape_s)
        return s, t
    return make


def _layers(lower, upper, noise=0.3):
    """(student_lower, student_upper, teacher_lower, teacher_upper), the student near the teacher."""
    def make(rng):
        tl, tu = rng.normal(size=lower), rng.normal(size=upper)
        return tl + noise * rng.normal(size=lower), tu + noise * rng.normal(size=upper), tl, tu
    return make


CASES = [
    FeatureCase("fitnets", _pair((6, 2, 2, 3), (6, 2, 2, 3)), lambda s, t, **kw: losses.fitnets(s, t, **kw)),
    FeatureCase("fitnets", _pair((6, 5), (6, 5)), lambda s, t, **kw: losses.fitnets(s, t, **kw), id="fitnets_embedding"),
    FeatureCase("at", _pair((6, 3, 3, 2), (6, 3, 3, 4)), lambda s, t, **kw: losses.at(s, t, p=3.0, **kw)),
    FeatureCase("at", _pair((6, 4, 4, 2), (6, 2, 2, 3)), lambda s, t, **kw: losses.at(s, t, **kw), id="at_pooled"),
    FeatureCase("nst", _pair((6, 3, 3, 2), (6, 3, 3, 4)),
                lambda s, t, **kw: losses.nst(s, t, degree=3, constant=0.5, **kw)),
    FeatureCase("nst", _pair((6, 2, 2, 3), (6, 4, 4, 2)), lambda s, t, **kw: losses.nst(s, t, **kw), id="nst_pooled"),
    FeatureCase("fsp", _layers((6, 4, 4, 2), (6, 2, 2, 3)), lambda *f, **kw: losses.fsp(*f, **kw),
                batched=(0, 1, 2, 3), grad=(0, 1)),
    FeatureCase("kdsvd", _layers((6, 3, 3, 3), (6, 2, 2, 4)), lambda *f, **kw: losses.kdsvd(*f, k=2, **kw),
                batched=(0, 1, 2, 3), grad=(0, 1)),
    FeatureCase("pkt", _pair((6, 4), (6, 3)), lambda s, t, **kw: losses.pkt(s, t, eps=1e-5, **kw), relational=True),
    FeatureCase("pkt", _pair((6, 2, 2, 2), (6, 5)), lambda s, t, **kw: losses.pkt(s, t, **kw), relational=True,
                id="pkt_maps"),
]
