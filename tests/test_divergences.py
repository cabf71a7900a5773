"""The logit divergences of jaxkd/losses/logit/divergences.py (forward/reverse KL, JS, GKD's generalized JSD,
DistiLLM's skew KLs, total variation, Alpha-Beta) against float64 NumPy references written from the
formulas: values, limits and closed forms, DistiLLM's cross-entropy form, the one-sided ``-inf``
conventions, all-excluded rows, argument checks, and their method factories.

Gradients, bfloat16, jit == eager, classes excluded on both sides, NaN/+inf propagation, nonnegativity
and shift invariance are checked for every loss in tests/test_loss_contract.py.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxkd import losses as D
from jaxkd import methods as M
from jaxkd.methods import LossInputs
from jaxkd.models import Outputs

from tests.numpy_reference import np_kl_finite, np_masked_softmax, rand_logits

T = 1.7  # a temperature != 1 for the reference tests
# One logits shape almost everywhere: op-by-op (eager) execution then compiles each primitive once.
SHAPE = (4, 7)
NONE = {"reduction": "none"}


# ----- NumPy references (float64, written from the formulas; on tests/numpy_reference.py's masked
# softmax, which gives excluded classes no mass, and np_kl_finite, which drops +inf terms) -----

def np_fkl(zs, zt, temperature=1.0):
    return np_kl_finite(np_masked_softmax(zt, temperature), np_masked_softmax(zs, temperature))


def np_rkl(zs, zt, temperature=1.0):
    return np_kl_finite(np_masked_softmax(zs, temperature), np_masked_softmax(zt, temperature))


def np_gjsd(zs, zt, temperature=1.0, beta=0.5):
    pt, ps = np_masked_softmax(zt, temperature), np_masked_softmax(zs, temperature)
    if beta == 0:
        return np_kl_finite(pt, ps)
    if beta == 1:
        return np_kl_finite(ps, pt)
    m = beta * pt + (1 - beta) * ps
    return beta * np_kl_finite(pt, m) + (1 - beta) * np_kl_finite(ps, m)


def np_js(zs, zt, temperature=1.0):
    pt, ps = np_masked_softmax(zt, temperature), np_masked_softmax(zs, temperature)
    m = 0.5 * (pt + ps)
    return 0.5 * np_kl_finite(pt, m) + 0.5 * np_kl_finite(ps, m)


def np_skl(zs, zt, temperature=1.0, alpha=0.1):
    pt, ps = np_masked_softmax(zt, temperature), np_masked_softmax(zs, temperature)
    return np_kl_finite(pt, alpha * pt + (1 - alpha) * ps)


def np_srkl(zs, zt, temperature=1.0, alpha=0.1):
    pt, ps = np_masked_softmax(zt, temperature), np_masked_softmax(zs, temperature)
    return np_kl_finite(ps, (1 - alpha) * pt + alpha * ps)


def np_tvd(zs, zt, temperature=1.0):
    return 0.5 * np.abs(np_masked_softmax(zt, temperature) - np_masked_softmax(zs, temperature)).sum(-1)


def np_ab_probs(p, q, a, b):
    """Cichocki, Cruces & Amari (2011), Eq. (4) and its limiting cases, P = p, Q = q; +inf terms dropped."""
    with np.errstate(all="ignore"):
        s = a + b
        if a == 0 and b == 0:
            t = 0.5 * (np.log(p) - np.log(q)) ** 2
        elif s == 0:
            r = q**a / p**a
            t = (np.log(r) + 1 / r - 1) / a**2
        elif b == 0:
            t = (np.where(p > 0, p**a * np.log(p**a / q**a), 0.0) - p**a + q**a) / a**2
        elif a == 0:
            t = (np.where(q > 0, q**b * np.log(q**b / p**b), 0.0) - q**b + p**b) / b**2
        else:
            t = -(p**a * q**b - a / s * p**s - b / s * q**s) / (a * b)
        t = np.where(np.isfinite(t) & ((p > 0) | (q > 0)), t, 0.0)
    return t.sum(-1)


def np_ab(zs, zt, temperature=1.0, alpha=1.0, beta=1.0):
    return np_ab_probs(np_masked_softmax(zt, temperature), np_masked_softmax(zs, temperature), alpha, beta)


logits = partial(rand_logits, scale=2.5)


# (name, jax function, NumPy reference, hyper-parameters)
CASES = [
    ("fkl", D.forward_kl, np_fkl, {}),
    ("rkl", D.reverse_kl, np_rkl, {}),
    ("js", D.js_divergence, np_js, {}),
    ("gjsd0.3", D.generalized_jsd, np_gjsd, {"beta": 0.3}),
    ("gjsd0", D.generalized_jsd, np_gjsd, {"beta": 0.0}),
    ("gjsd1", D.generalized_jsd, np_gjsd, {"beta": 1.0}),
    ("skl", D.skew_kl, np_skl, {"alpha": 0.1}),
    ("srkl", D.skew_reverse_kl, np_srkl, {"alpha": 0.3}),
    ("tvd", D.total_variation, np_tvd, {}),
    ("ab(.5,.5)", D.alpha_beta_divergence, np_ab, {"alpha": 0.5, "beta": 0.5}),
    ("ab(2,-.5)", D.alpha_beta_divergence, np_ab, {"alpha": 2.0, "beta": -0.5}),
    ("ab(-.5,1.5)", D.alpha_beta_divergence, np_ab, {"alpha": -0.5, "beta": 1.5}),
    ("ab(.7,-.7)", D.alpha_beta_divergence, np_ab, {"alpha": 0.7, "beta": -0.7}),
    ("ab(.5,0)", D.alpha_beta_divergence, np_ab, {"alpha": 0.5, "beta": 0.0}),
    ("ab(0,2)", D.alpha_beta_divergence, np_ab, {"alpha": 0.0, "beta": 2.0}),
    ("ab(0,0)", D.alpha_beta_divergence, np_ab, {"alpha": 0.0, "beta": 0.0}),
]
IDS = [c[0] for c in CASES]


# ----- values against NumPy -----

@pytest.mark.parametrize("name,fn,ref,kw", CASES, ids=IDS)
def test_matches_numpy_reference(name, fn, ref, kw):
    zs, zt = logits(0, SHAPE), logits(1, SHAPE)
    np.testing.assert_allclose(fn(zs, zt, temperature=T, **kw, **NONE), ref(zs, zt, T, **kw), rtol=2e-5, atol=1e-6)


def test_reduction_mask_weights_on_sequence_shaped_logits():
    zs, zt = logits(2, (2, 2, 7)), logits(3, (2, 2, 7))
    per = np_js(zs, zt, T)
    mask = np.array([[1, 1], [0, 1]], bool)
    w = np.arange(1.0, 5.0).reshape(2, 2)
    js = lambda **kw: D.js_divergence(zs, zt, temperature=T, **kw)
    np.testing.assert_allclose(js(mask=mask), per[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(js(weights=w), (w * per).sum() / w.sum(), rtol=1e-5)
    np.testing.assert_allclose(js(reduction="sum"), per.sum(), rtol=1e-5)
    np.testing.assert_allclose(js(reduction="none"), per, rtol=1e-5)


_ALL = jax.jit(lambda s, t: jnp.stack([fn(s, t, temperature=1.5, **kw, **NONE) for _, fn, _, kw in CASES]))


@settings(max_examples=25)
@given(z=hnp.arrays(np.float32, (3, 6), elements=st.floats(-20, 20, width=32)), shift=st.floats(-10, 10))
def test_zero_on_equal_distributions(z, shift):
    np.testing.assert_allclose(_ALL(z, z + np.float32(shift)), 0.0, atol=1e-4)


# ----- limits and closed forms -----

def test_gjsd_with_a_traced_beta_takes_the_endpoint_branches():
    zs, zt = logits(12, SHAPE), logits(13, SHAPE)
    f = jax.jit(lambda b: D.generalized_jsd(zs, zt, beta=b, temperature=T, **NONE))
    for b in (0.0, 0.3, 1.0):
        np.testing.assert_allclose(f(b), np_gjsd(zs, zt, T, b), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(D.generalized_jsd(zs, zt, beta=0.5, **NONE), np_js(zs, zt), rtol=2e-5)


def test_gjsd_small_beta_limit():
    # JSD_b = b KL(pT||pS) + O(b²), so JSD_b / b -> KL(pT||pS) as b -> 0, and JSD_b / (1 - b) -> KL(pS||pT)
    # as b -> 1 (why TRL's endpoint special cases are forward/reverse KL).
    zs, zt = logits(14, SHAPE, scale=1.0), logits(15, SHAPE, scale=1.0)
    fkl, rkl = np_fkl(zs, zt, T), np_rkl(zs, zt, T)
    for b in (1e-2, 1e-3):
        got = np.asarray(D.generalized_jsd(zs, zt, beta=b, temperature=T, **NONE))
        np.testing.assert_allclose(got, np_gjsd(zs, zt, T, b), rtol=1e-3)  # float32 vs float64 at the same beta
        np.testing.assert_allclose(got / b, fkl, rtol=20 * b)
        got = np.asarray(D.generalized_jsd(zs, zt, beta=1 - b, temperature=T, **NONE))
        np.testing.assert_allclose(got, np_gjsd(zs, zt, T, 1 - b), rtol=1e-3)
        np.testing.assert_allclose(got / b, rkl, rtol=20 * b)
    errors = [np.abs(np_gjsd(zs, zt, T, b) / b - fkl).max() for b in (1e-1, 1e-2, 1e-3, 1e-4)]
    assert all(e2 < e1 / 5 for e1, e2 in zip(errors, errors[1:]))  # O(b) convergence


def test_gjsd_beta_weights_the_teacher_not_the_student():
    # The swapped-beta bug (TRL PR #3043): the mixture must be beta*pT + (1-beta)*pS.
    zs, zt = logits(34, SHAPE, scale=3.0), logits(35, SHAPE, scale=3.0)
    beta = 0.1
    pt, ps = np_masked_softmax(zt), np_masked_softmax(zs)
    right = (beta * np_kl_finite(pt, beta * pt + (1 - beta) * ps)
             + (1 - beta) * np_kl_finite(ps, beta * pt + (1 - beta) * ps))
    swapped = (beta * np_kl_finite(pt, beta * ps + (1 - beta) * pt)
               + (1 - beta) * np_kl_finite(ps, beta * ps + (1 - beta) * pt))
    assert np.all(np.abs(right - swapped) > 0.1 * np.abs(right))
    np.testing.assert_allclose(D.generalized_jsd(zs, zt, beta=beta, **NONE), right, rtol=1e-5)
    # and small beta is close to forward KL / beta-scaled, not reverse KL
    np.testing.assert_allclose(D.generalized_jsd(zs, zt, beta=1e-3) / 1e-3, np_kl_finite(pt, ps).mean(), rtol=0.05)
    assert abs(np_kl_finite(pt, ps).mean() - np_kl_finite(ps, pt).mean()) > 0.2


def test_skew_limits_and_which_side_alpha_weights():
    zs, zt = logits(16, SHAPE), logits(17, SHAPE)
    kw = {"temperature": T, **NONE}
    np.testing.assert_allclose(D.skew_kl(zs, zt, alpha=0.0, **kw), np_fkl(zs, zt, T), rtol=2e-5)
    np.testing.assert_allclose(D.skew_reverse_kl(zs, zt, alpha=0.0, **kw), np_rkl(zs, zt, T), rtol=2e-5)
    np.testing.assert_allclose(D.skew_kl(zs, zt, alpha=1.0, **kw), 0.0, atol=1e-7)
    np.testing.assert_allclose(D.skew_reverse_kl(zs, zt, alpha=1.0, **kw), 0.0, atol=1e-7)
    # alpha weights the teacher in SKL and the student in SRKL (distillm/losses.py)
    pt, ps = np_masked_softmax(zt, T), np_masked_softmax(zs, T)
    np.testing.assert_allclose(D.skew_kl(zs, zt, alpha=0.2, **kw), np_kl_finite(pt, 0.2 * pt + 0.8 * ps), rtol=1e-5)
    np.testing.assert_allclose(D.skew_reverse_kl(zs, zt, alpha=0.2, **kw), np_kl_finite(ps, 0.8 * pt + 0.2 * ps),
                               rtol=1e-5)


def test_skew_kl_gradient_matches_distillm_cross_entropy_form():
    # DistiLLM's skewed_forward_kl is -sum pT log(a pT + (1-a) pS) (token mean); it differs from the KL form
    # by H(pT), a constant in the student, so the student gradients agree.
    zs, zt = jnp.asarray(logits(18, SHAPE)), jnp.asarray(logits(19, SHAPE))
    a = 0.1

    def distillm_ce(s):
        pt, ps = jax.nn.softmax(zt / T), jax.nn.softmax(s / T)
        return jnp.mean(-jnp.sum(pt * jnp.log(a * pt + (1 - a) * ps), axis=-1))

    g_kl = jax.jit(jax.grad(lambda s: D.skew_kl(s, zt, alpha=a, temperature=T)))(zs)
    np.testing.assert_allclose(g_kl, jax.jit(jax.grad(distillm_ce))(zs), rtol=1e-4, atol=1e-7)
    pt = np_masked_softmax(zt, T)
    entropy = -(pt * np.log(pt)).sum(-1).mean()
    np.testing.assert_allclose(jax.jit(distillm_ce)(zs) - D.skew_kl(zs, zt, alpha=a, temperature=T), entropy, rtol=1e-5)


def test_ab_limits():
    zs, zt = logits(20, SHAPE, scale=1.5), logits(21, SHAPE, scale=1.5)
    ab = lambda a, b: np.asarray(D.alpha_beta_divergence(zs, zt, alpha=a, beta=b, temperature=T, **NONE))
    fkl, rkl = np_fkl(zs, zt, T), np_rkl(zs, zt, T)
    # exact limiting cases of Cichocki et al. (2011): (1, 0) is KL(P||Q), (0, 1) is KL(Q||P)
    np.testing.assert_allclose(ab(1.0, 0.0), fkl, rtol=1e-5)
    np.testing.assert_allclose(ab(0.0, 1.0), rkl, rtol=1e-5)
    # approaching (1, 0) through the general formula: error O(beta), accurate in float32 even at beta = 1e-5
    errors = []
    for b in (1e-2, 1e-3, 1e-4, 1e-5):
        errors.append(np.abs(ab(1.0, b) - fkl).max())
        np.testing.assert_allclose(ab(1.0, b), np_ab(zs, zt, T, 1.0, b), rtol=1e-4)
    assert all(e2 < e1 / 5 for e1, e2 in zip(errors, errors[1:])) and errors[-1] < 1e-4
    # the other limiting cases: accurate next to the limit, and the limit formulas are its continuation.
    # (Next to alpha = beta = 0 float32 cancellation costs ~1e-7/|alpha|, hence the larger offset there.)
    for (a, b), (a0, b0), eps in [
        ((0.5, 1e-4), (0.5, 0.0), 1e-4),
        ((1e-4, 2.0), (0.0, 2.0), 1e-4),
        ((0.7, -0.7 + 1e-4), (0.7, -0.7), 1e-4),
        ((1e-2, 1e-2), (0.0, 0.0), 1e-2),
    ]:
        np.testing.assert_allclose(ab(a, b), np_ab(zs, zt, T, a, b), rtol=1e-4)
        np.testing.assert_allclose(ab(a, b), np_ab(zs, zt, T, a0, b0), rtol=50 * eps)
    # (1, 1): half the squared Euclidean distance
    np.testing.assert_allclose(ab(1.0, 1.0), 0.5 * ((np_masked_softmax(zt, T) - np_masked_softmax(zs, T)) ** 2).sum(-1),
                               rtol=1e-4)


def test_ab_is_zero_only_on_equal_distributions():
    zs, zt = logits(22, SHAPE), logits(23, SHAPE)
    for a, b in [(0.5, 0.5), (1.0, 0.0), (0.7, -0.7), (0.0, 0.0), (2.0, -0.5)]:
        assert np.all(np.asarray(D.alpha_beta_divergence(zs, zt, alpha=a, beta=b, **NONE)) > 1e-3)
        np.testing.assert_allclose(D.alpha_beta_divergence(zt - 1.0, zt, alpha=a, beta=b, **NONE), 0.0, atol=1e-6)


# ----- excluded (-inf) classes on one side, and all-excluded rows -----

def _one_sided_masks():
    zs, zt = logits(28, SHAPE), logits(29, SHAPE)
    zt[0, 1] = -np.inf    # teacher alone excludes a class
    zs[1, 2] = -np.inf    # student alone excludes a class
    zt[2, 3] = zs[2, 4] = -np.inf  # each excludes a different one
    return zs, zt


@pytest.mark.parametrize("name,fn,ref,kw", CASES, ids=IDS)
def test_one_sided_exclusions_follow_the_documented_convention(name, fn, ref, kw):
    # Exact divergence with zero-mass entries, +inf KL terms dropped (the NumPy reference implements
    # this); no NaN gradient, and none at all into a class the student excludes.
    zs, zt = _one_sided_masks()
    value, (gs, gt) = jax.value_and_grad(lambda s, t: fn(s, t, temperature=T, **kw, **NONE).sum(), (0, 1))(zs, zt)
    np.testing.assert_allclose(fn(zs, zt, temperature=T, **kw, **NONE), ref(zs, zt, T, **kw), rtol=2e-5, atol=1e-6)
    assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))
    assert np.all(np.asarray(gs)[np.isneginf(zs)] == 0) and np.all(np.asarray(gt)[np.isneginf(zt)] == 0)


def test_one_sided_conventions_spelled_out():
    zs, zt = logits(36, SHAPE), logits(37, SHAPE)
    zs[:, 2] = -np.inf  # the student alone excludes class 2
    pt, ps = np_masked_softmax(zt), np_masked_softmax(zs)
    keep = [0, 1, 3, 4, 5, 6]
    # forward KL drops the +inf term of class 2 (DistiLLM's convention); JS and TV count it exactly
    fkl = (pt[:, keep] * np.log(pt[:, keep] / ps[:, keep])).sum(-1)
    np.testing.assert_allclose(D.forward_kl(zs, zt, **NONE), fkl, rtol=1e-5)
    m = 0.5 * (pt + ps)
    js = 0.5 * (pt * np.log(pt / m)).sum(-1) + 0.5 * (ps[:, keep] * np.log(ps[:, keep] / m[:, keep])).sum(-1)
    np.testing.assert_allclose(D.js_divergence(zs, zt, **NONE), js, rtol=1e-5)
    np.testing.assert_allclose(D.total_variation(zs, zt, **NONE), 0.5 * np.abs(pt - ps).sum(-1), rtol=1e-5)
    # reverse KL where the teacher alone excludes class 2 (student = zt, teacher = zs): that +inf term is
    # dropped; SRKL counts it exactly
    np.testing.assert_allclose(D.reverse_kl(zt, zs, **NONE), fkl, rtol=1e-5)
    m = 0.8 * ps + 0.2 * pt  # SRKL(student=zt, teacher=zs), alpha=0.2: KL(p_zt || 0.8 p_zs + 0.2 p_zt)
    np.testing.assert_allclose(D.skew_reverse_kl(zt, zs, alpha=0.2, **NONE), (pt * np.log(pt / m)).sum(-1), rtol=1e-5)


@pytest.mark.parametrize("name,fn,ref,kw", CASES, ids=IDS)
def test_all_excluded_rows(name, fn, ref, kw):
    # Two all -inf rows are two zero distributions: exactly 0. A teacher with no mass at all against a
    # real student: the NumPy reference with zero-mass entries. Gradients stay finite.
    zs, zt = logits(32, SHAPE), logits(33, SHAPE)
    zs[0] = zt[0] = -np.inf
    zt[1] = -np.inf
    f = lambda s, t: fn(s, t, temperature=T, **kw, **NONE)
    value = np.asarray(f(zs, zt))
    assert value[0] == 0.0
    np.testing.assert_allclose(value, ref(zs, zt, T, **kw), rtol=2e-5, atol=1e-6)
    g = jax.grad(lambda s: f(s, zt).sum())(zs)
    assert np.all(np.isfinite(g))


# ----- bad input -----

@pytest.mark.parametrize("name,fn,ref,kw", CASES, ids=IDS)
def test_bad_temperature_and_shapes_raise(name, fn, ref, kw):
    z = np.zeros((2, 3), np.float32)
    for t in (0.0, -1.0, np.inf, 1e30, 1e-30, "2"):
        with pytest.raises(ValueError, match="temperature"):
            fn(z, z, temperature=t, **kw)
    with pytest.raises(ValueError, match="number of classes"):
        fn(z, np.zeros((2, 4), np.float32), **kw)
    with pytest.raises(ValueError, match="same shape"):
        fn(z, np.zeros((3, 3), np.float32), **kw)


def test_bad_hyperparameters_raise():
    z = np.zeros((2, 3), np.float32)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\], got beta="):
            D.generalized_jsd(z, z, beta=bad)
        with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
            D.skew_kl(z, z, alpha=bad)
        with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
            D.skew_reverse_kl(z, z, alpha=bad)
    for bad in ("0.5", True):
        with pytest.raises(ValueError, match="beta must be a number"):
            D.generalized_jsd(z, z, beta=bad)
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        D.alpha_beta_divergence(z, z, alpha=float("nan"), beta=1.0)
    with pytest.raises(ValueError, match="beta must be a finite number"):
        D.alpha_beta_divergence(z, z, alpha=1.0, beta=float("inf"))
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(lambda a: D.alpha_beta_divergence(z, z, alpha=a, beta=1.0))(0.5)
    with pytest.raises(ValueError, match="reduction"):
        D.js_divergence(z, z, reduction="avg")


# ----- method factories -----

MASK = np.array([1, 1, 0, 1], bool)
METHODS = [
    ("forward_kl", M.forward_kl(temperature=2.0), lambda s, t: np_fkl(s, t, 2.0)),
    ("reverse_kl", M.reverse_kl(temperature=2.0), lambda s, t: np_rkl(s, t, 2.0)),
    ("js_divergence", M.js_divergence(), np_js),
    ("generalized_jsd", M.generalized_jsd(beta=0.9), lambda s, t: np_gjsd(s, t, beta=0.9)),
    ("skew_kl", M.skew_kl(), np_skl),
    ("skew_reverse_kl", M.skew_reverse_kl(alpha=0.2), lambda s, t: np_srkl(s, t, alpha=0.2)),
    ("total_variation", M.total_variation(temperature=3.0), lambda s, t: np_tvd(s, t, 3.0)),
    ("alpha_beta_divergence", M.alpha_beta_divergence(alpha=0.5, beta=0.5), lambda s, t: np_ab(s, t, alpha=0.5, beta=0.5)),
]


def fake_inputs(seed=0, teacher=True):
    zs, zt = logits(seed, SHAPE), logits(seed + 1, SHAPE)
    return LossInputs.of(student=Outputs(jnp.asarray(zs), {}, {}),
                      teacher=Outputs(jnp.asarray(zt), {}, {}) if teacher else None,
                      batch={"mask": MASK}, step=jnp.asarray(0, jnp.int32))


@pytest.mark.parametrize("name,method,ref", METHODS, ids=[m[0] for m in METHODS])
def test_methods_match_numpy_over_the_unmasked_examples(name, method, ref):
    assert method.name == name and method.needs.teacher and method.weight == 1.0
    inputs = fake_inputs()
    value, aux = method.loss(method.init(jax.random.PRNGKey(0), inputs), inputs, jax.random.PRNGKey(1))
    zs, zt = (np.asarray(inputs.outputs[n].logits) for n in ("student", "teacher"))
    expected = ref(zs, zt)[MASK].mean()
    np.testing.assert_allclose(value, expected, rtol=2e-5)
    assert dict(aux.metrics) == {}


def test_method_factories_validate_arguments():
    for bad, match in [
        (lambda: M.reverse_kl(temperature=0.0), "temperature"),
        (lambda: M.forward_kl(temperature=1e3), "temperature"),
        (lambda: M.generalized_jsd(beta=1.2), "beta"),
        (lambda: M.skew_kl(alpha=-0.1), "alpha"),
        (lambda: M.skew_reverse_kl(alpha=2.0), "alpha"),
        (lambda: M.alpha_beta_divergence(alpha="one", beta=1.0), "alpha must be a number"),
        (lambda: M.total_variation(weight=-1.0), "weight"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()
    with pytest.raises(ValueError, match="'js_divergence' needs the outputs of participant 'teacher'"):
        M.js_divergence().loss(None, fake_inputs(teacher=False), jax.random.PRNGKey(0))
