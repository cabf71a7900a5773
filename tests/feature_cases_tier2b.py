"""Contract cases for the ranking (Margin-MSE, listwise), TRG and DMAE losses."""

from __future__ import annotations

import numpy as np

from jaxkd import losses
from tests.feature_contract import FeatureCase

_CANDIDATES = np.ones((6, 4), bool)
_CANDIDATES[1, 3] = _CANDIDATES[4, 2:] = False  # ragged lists; the positive (column 0) is always real
_VISIBLE = np.random.default_rng(5).random((6, 3, 3)) < 0.5
_VISIBLE[:, 0, 0] = True  # every example compares at least one position (and the NaN test's)


def _scores(rng):
    return rng.normal(size=(6, 4)), 2.0 * rng.normal(size=(6, 4)) + 1.0


def _tokens(ds, dt):
    return lambda rng: (rng.normal(size=(6, 4, ds)), rng.normal(size=(6, 4, dt)))


CASES = [
    FeatureCase(
        "margin_mse", _scores, lambda s, t, **kw: losses.margin_mse(s, t, candidate_mask=_CANDIDATES, **kw),
        grad=(0, 1),
    ),
    FeatureCase(
        "listwise_kd", _scores,
        lambda s, t, **kw: losses.listwise_kd(
            s, t, temperature=2.0, teacher_temperature=0.5, candidate_mask=_CANDIDATES, **kw
        ),
        grad=(0, 1),
    ),
    FeatureCase("trg_contextual", _tokens(3, 5), lambda s, t, **kw: losses.trg_contextual(s, t, **kw), grad=(0, 1)),
    FeatureCase(
        "trg_local", _tokens(3, 5), lambda s, t, **kw: losses.trg_local(s, t, k=3, sigma=0.5, **kw),
        grad=(0, 1), relational=True,
    ),
    FeatureCase(
        "trg_global", _tokens(5, 5), lambda s, t, **kw: losses.trg_global(s, t, temperature=0.5, **kw),
        grad=(0, 1), relational=True,
    ),
    FeatureCase(
        "dmae", lambda rng: (rng.normal(size=(6, 3, 3, 4)), rng.normal(size=(6, 3, 3, 4))),
        lambda s, t, **kw: losses.dmae(s, t, _VISIBLE, **kw), grad=(0, 1),
    ),
    FeatureCase(
        "dmae", lambda rng: (rng.normal(size=(6, 5, 3)), rng.normal(size=(6, 5, 3))),
        lambda s, t, **kw: losses.dmae(s, t, distance="l2", normalize=False, **kw), grad=(0, 1), id="dmae_l2_tokens",
    ),
]
