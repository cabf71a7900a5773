"""Contract cases for SP, CC, RKD, VID, AB and FT's losses (run by tests/test_feature_contract.py)."""

from __future__ import annotations

import numpy as np

from jaxkd import losses
from tests.feature_contract import FeatureCase


def _maps_of_two_widths(rng):
    return rng.normal(size=(6, 2, 2, 3)), rng.normal(size=(6, 2, 2, 5))


def _embeddings_of_two_widths(rng):
    return rng.normal(size=(6, 4)), rng.normal(size=(6, 7))


def _embeddings(rng):
    return rng.normal(size=(6, 4)), rng.normal(size=(6, 4))


def _vid_inputs(rng):
    return rng.normal(size=(6, 2, 2, 3)), rng.normal(size=(6, 2, 2, 3)), rng.normal(size=(3,))


def _maps(rng):
    return rng.normal(size=(6, 2, 2, 3)), rng.normal(size=(6, 2, 2, 3))


CASES = [
    FeatureCase("sp", _maps_of_two_widths, lambda s, t, **kw: losses.sp(s, t, **kw), grad=(0, 1), relational=True),
    FeatureCase("cc", _embeddings, lambda s, t, **kw: losses.cc(s, t, **kw), grad=(0, 1), relational=True),
    FeatureCase(
        "rkd", _embeddings_of_two_widths,
        lambda s, t, **kw: losses.rkd(s, t, distance_weight=2.0, angle_weight=3.0, **kw),
        grad=(0, 1), relational=True, min_examples=3,
    ),
    FeatureCase(
        "rkd_terms", _maps_of_two_widths,
        lambda s, t, **kw: (lambda d, a: d + 0.5 * a)(*losses.rkd_terms(s, t, **kw)),
        grad=(0, 1), relational=True, min_examples=3,
    ),
    FeatureCase(
        "vid", _vid_inputs, lambda p, t, a, **kw: losses.vid(p, t, a, eps=1e-3, **kw), batched=(0, 1), grad=(0, 2),
    ),
    FeatureCase(
        "activation_boundary", _maps, lambda s, t, **kw: losses.activation_boundary(s, t, margin=0.5, **kw),
    ),
    FeatureCase(
        "factor_transfer", _maps, lambda s, t, **kw: losses.factor_transfer(s, t, power=3, **kw), grad=(0, 1),
    ),
    FeatureCase(
        "factor_transfer", _maps, lambda s, t, **kw: losses.factor_transfer(s, t, power=None, **kw), grad=(0, 1),
        id="factor_transfer_paper",
    ),
    FeatureCase(
        "paraphraser_reconstruction", _maps, lambda r, x, **kw: losses.paraphraser_reconstruction(r, x, **kw),
        grad=(0, 1),
    ),
]
