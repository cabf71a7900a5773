"""Contract cases for the losses ported from torchdistill: CC's kernel form, PAD-L2, KTA, affinity, SRD,
DIST+'s feature terms and SSKD."""

from __future__ import annotations

import jax.numpy as jnp

from jaxkd import losses
from tests.feature_contract import FeatureCase


def _labels(y, num_classes=5):
    """The case's float labels as class indices (the mask test fills masked rows with arbitrary floats)."""
    return jnp.clip(jnp.asarray(y).astype(jnp.int32), 0, num_classes - 1)


def _sskd_inputs(rng):
    return (rng.normal(size=(6, 4, 5)), 2.0 * rng.normal(size=(6, 4, 5)), rng.normal(size=(6, 4, 3)),
            rng.normal(size=(6, 4, 3)), rng.integers(0, 5, 6))


CASES = [
    FeatureCase(
        "cc_kernel", lambda rng: (0.5 * rng.normal(size=(6, 5)), 0.5 * rng.normal(size=(6, 4))),
        lambda s, t, **kw: losses.cc_kernel(s, t, gamma=0.6, order=3, **kw), grad=(0, 1), relational=True,
    ),
    FeatureCase(
        "cc_kernel", lambda rng: (rng.normal(size=(6, 3)), rng.normal(size=(6, 3))),
        lambda s, t, **kw: losses.cc_kernel(s, t, kernel="bilinear", **kw), grad=(0,), relational=True,
        id="cc_kernel_bilinear",
    ),
    FeatureCase(
        "pad_l2", lambda rng: (rng.normal(size=(6, 4)), rng.normal(size=(6, 4)), 0.5 * rng.normal(size=(6, 4))),
        lambda s, t, v, **kw: losses.pad_l2(s, t, v, eps=1e-3, **kw), batched=(0, 1, 2), grad=(0, 2),
    ),
    FeatureCase(
        "kta", lambda rng: (rng.normal(size=(6, 2, 2, 3)), rng.normal(size=(6, 2, 2, 3))),
        lambda s, t, **kw: losses.kta(s, t, **kw), grad=(0,),
    ),
    FeatureCase(
        "kta", lambda rng: (rng.normal(size=(6, 5)), rng.normal(size=(6, 5))),
        lambda s, t, **kw: losses.kta(s, t, p=3, q=1.5, **kw), grad=(0,), id="kta_p3_q1.5",
    ),
    FeatureCase(
        "affinity", lambda rng: (rng.normal(size=(6, 2, 3, 3)), rng.normal(size=(6, 2, 3, 3))),
        lambda s, t, **kw: losses.affinity(s, t, **kw), grad=(0, 1),
    ),
    FeatureCase(
        "srd", lambda rng: (rng.normal(size=(6, 4)), rng.normal(size=(6, 4))),
        lambda s, t, **kw: losses.srd(s, t, exponent=3.0, **kw), grad=(0,), relational=True,
    ),
    FeatureCase(
        "dist_plus_feature_terms", lambda rng: (rng.normal(size=(6, 2, 2, 4)), rng.normal(size=(6, 2, 2, 4))),
        lambda s, t, **kw: sum(losses.dist_plus_feature_terms(s, t, **kw)), grad=(0,), relational=True,
    ),
    FeatureCase(
        "sskd_terms", _sskd_inputs,
        lambda zs, zt, ss, st, y, **kw: sum(losses.sskd_terms(
            zs, zt, ss, st, _labels(y), kl_temperature=2.0, ss_temperature=0.5, tf_temperature=3.0, ss_ratio=0.5,
            tf_ratio=0.75, **kw)),
        batched=(0, 1, 2, 3, 4), grad=(0, 2), relational=True,
    ),
    FeatureCase(
        "sskd_contrastive_ce", lambda rng: (rng.normal(size=(6, 4, 3)),),
        lambda ss, **kw: losses.sskd_contrastive_ce(ss, **kw), batched=(0,), grad=(0,), relational=True,
    ),
]
