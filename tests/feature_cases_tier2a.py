"""Contract cases for OFA-KD, ND, LSSKD and DisWOT losses."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxkd import losses
from tests.feature_contract import FeatureCase

_Y = np.array([0, 3, 1, 4, 2, 3], np.int32)  # fixed labels of the six examples (per-example losses)


def _labels(y):
    """Labels carried as a float input (so the relational mask test slices them with the batch)."""
    return jnp.asarray(jnp.round(y), jnp.int32) % 5


def _logits_pair(rng):
    return 1.5 * rng.normal(size=(6, 5)), 1.5 * rng.normal(size=(6, 5))


CASES = [
    FeatureCase(
        "ofa", _logits_pair,
        lambda s, t, **kw: losses.ofa(s, t, _Y, eps=1.5, temperature=2.0, **kw), grad=(0, 1),
    ),
    FeatureCase(
        "nd",
        lambda rng: (rng.normal(size=(6, 4)), rng.normal(size=(6, 4)), rng.normal(size=(5, 4))),
        lambda s, t, c, **kw: losses.nd(s, t, _Y, c, **kw), grad=(0, 1),
    ),
    FeatureCase(
        "lsskd",
        lambda rng: tuple(1.5 * rng.normal(size=s) for s in ((6, 5), (6, 3, 5), (6, 5), (6, 3, 5))),
        lambda z, a, zt, at, **kw: losses.lsskd(
            z, a, zt, at, _Y, temperature=2.0, aux_ce_weight=0.5, aux_kd_weight=1.5, final_kd_weight=0.7, **kw
        ),
        batched=(0, 1, 2, 3), grad=(0, 1, 2, 3),
    ),
    FeatureCase(
        "lsskd_terms",
        lambda rng: tuple(1.5 * rng.normal(size=s) for s in ((6, 5), (6, 2, 5), (6, 5), (6, 2, 5))),
        lambda z, a, zt, at, **kw: sum(losses.lsskd_terms(z, a, zt, at, _Y, temperature=1.5, **kw)),
        batched=(0, 1, 2, 3), grad=(0, 1, 2, 3),
    ),
    FeatureCase(
        "lsskd",
        lambda rng: tuple(1.5 * rng.normal(size=s) for s in ((6, 5), (6, 2, 2, 10), (6, 5), (6, 2, 2, 10))),
        lambda z, a, zt, at, **kw: losses.lsskd(
            z, a, zt, at, _Y, temperature=2.0, aux_ce_weight=0.5, aux_kd_weight=1.5, final_kd_weight=0.7,
            transformations=2, **kw
        ),
        batched=(0, 1, 2, 3), grad=(0, 1, 2, 3), id="lsskd_transformations",
    ),
    FeatureCase(
        "lsskd_terms",
        lambda rng: tuple(1.5 * rng.normal(size=s) for s in ((6, 5), (6, 1, 4, 20), (6, 5), (6, 1, 4, 20))),
        lambda z, a, zt, at, **kw: sum(losses.lsskd_terms(z, a, zt, at, _Y, temperature=1.5, transformations=4, **kw)),
        batched=(0, 1, 2, 3), grad=(0, 1, 2, 3), id="lsskd_terms_rotations",
    ),
    FeatureCase(
        "diswot_relation",
        lambda rng: (rng.normal(size=(6, 2, 2, 3)), rng.normal(size=(6, 5))),
        lambda s, t, **kw: losses.diswot_relation(s, t, **kw), grad=(0, 1), relational=True,
    ),
    FeatureCase(
        "diswot_semantic",
        lambda rng: (
            1.5 * rng.normal(size=(6, 5)), rng.normal(size=(6, 3)), 1.5 * rng.normal(size=(6, 5)),
            rng.normal(size=(6, 4)), rng.integers(0, 5, size=6).astype(np.float64),
        ),
        lambda zs, es, zt, et, y, **kw: losses.diswot_semantic(zs, es, zt, et, _labels(y), **kw),
        batched=(0, 1, 2, 3, 4), grad=(0, 1, 2, 3), relational=True,
    ),
]
