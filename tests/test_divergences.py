"""Logit divergences (forward/reverse KL, JS, GKD's generalized JSD, DistiLLM skew KL, TV, AB) and the
sparse top-k teacher, against NumPy references written from the formulas (float64), plus their limits,
properties, gradients, dtypes, masked vocabulary, bad input, and the method factories."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.test_util import check_grads

from jaxkd.losses import divergences as D
from jaxkd.losses import log_softmax
from jaxkd.losses import sparse as S
from jaxkd.methods import LossInputs
from jaxkd.methods import divergences as M
from jaxkd.models import Outputs

T = 1.7  # a temperature != 1 for the reference tests
# One logits shape almost everywhere: op-by-op (eager) execution then compiles each primitive once.
SHAPE = (4, 7)


# ----- NumPy references (float64, written from the formulas) -----

def np_log_softmax(z, temperature=1.0):
    z = np.asarray(z, np.float64) / temperature
    fin = np.isfinite(z)
    hi = np.max(np.where(fin, z, -np.inf), axis=-1, keepdims=True)
    hi = np.where(np.isfinite(hi), hi, 0.0)
    total = np.where(fin, np.exp(np.where(fin, z - hi, 0.0)), 0.0).sum(-1, keepdims=True)
    return np.where(fin, z - hi - np.log(np.where(total > 0, total, 1.0)), -np.inf)


def np_probs(z, temperature=1.0):
    return np.exp(np_log_softmax(z, temperature))


def np_kl(p, q):
    """Σ p log(p/q) over entries with p > 0 and q > 0 (the documented convention: +inf terms dropped)."""
    ok = (p > 0) & (q > 0)
    return np.where(ok, p * np.log(np.where(ok, p, 1.0) / np.where(ok, q, 1.0)), 0.0).sum(-1)


def np_fkl(zs, zt, temperature=1.0):
    return np_kl(np_probs(zt, temperature), np_probs(zs, temperature))


def np_rkl(zs, zt, temperature=1.0):
    return np_kl(np_probs(zs, temperature), np_probs(zt, temperature))


def np_gjsd(zs, zt, temperature=1.0, beta=0.5):
    pt, ps = np_probs(zt, temperature), np_probs(zs, temperature)
    if beta == 0:
        return np_kl(pt, ps)
    if beta == 1:
        return np_kl(ps, pt)
    m = beta * pt + (1 - beta) * ps
    return beta * np_kl(pt, m) + (1 - beta) * np_kl(ps, m)


def np_js(zs, zt, temperature=1.0):
    pt, ps = np_probs(zt, temperature), np_probs(zs, temperature)
    m = 0.5 * (pt + ps)
    return 0.5 * np_kl(pt, m) + 0.5 * np_kl(ps, m)


def np_skl(zs, zt, temperature=1.0, alpha=0.1):
    pt, ps = np_probs(zt, temperature), np_probs(zs, temperature)
    return np_kl(pt, alpha * pt + (1 - alpha) * ps)


def np_srkl(zs, zt, temperature=1.0, alpha=0.1):
    pt, ps = np_probs(zt, temperature), np_probs(zs, temperature)
    return np_kl(ps, (1 - alpha) * pt + alpha * ps)


def np_tvd(zs, zt, temperature=1.0):
    return 0.5 * np.abs(np_probs(zt, temperature) - np_probs(zs, temperature)).sum(-1)


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
    return np_ab_probs(np_probs(zt, temperature), np_probs(zs, temperature), alpha, beta)


def np_sparse(zs, idx, log_p, temperature, tail):
    q = np_probs(zs, temperature)
    qk = np.take_along_axis(q, idx, -1)
    pk = np.exp(np.asarray(log_p, np.float64))
    if tail == "drop":
        with np.errstate(invalid="ignore"):  # a row with no student mass on K: 0/0, dropped by np_kl
            return np_kl(pk / pk.sum(-1, keepdims=True), qk / qk.sum(-1, keepdims=True))
    outside = np.ones_like(q, bool)
    np.put_along_axis(outside, idx, False, -1)
    p_tail = np.maximum(1 - pk.sum(-1, keepdims=True), 0.0)
    q_tail = np.where(outside, q, 0.0).sum(-1, keepdims=True)
    return np_kl(np.concatenate([pk, p_tail], -1), np.concatenate([qk, q_tail], -1))


def rand_logits(seed, shape, scale=2.5):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


# (name, per-example jax function, NumPy reference, reduced jax function, hyper-parameters)
CASES = [
    ("fkl", D.forward_kl_per_example, np_fkl, D.forward_kl, {}),
    ("rkl", D.reverse_kl_per_example, np_rkl, D.reverse_kl, {}),
    ("js", D.js_divergence_per_example, np_js, D.js_divergence, {}),
    ("gjsd0.3", D.generalized_jsd_per_example, np_gjsd, D.generalized_jsd, {"beta": 0.3}),
    ("gjsd0", D.generalized_jsd_per_example, np_gjsd, D.generalized_jsd, {"beta": 0.0}),
    ("gjsd1", D.generalized_jsd_per_example, np_gjsd, D.generalized_jsd, {"beta": 1.0}),
    ("skl", D.skew_kl_per_example, np_skl, D.skew_kl, {"alpha": 0.1}),
    ("srkl", D.skew_reverse_kl_per_example, np_srkl, D.skew_reverse_kl, {"alpha": 0.3}),
    ("tvd", D.total_variation_per_example, np_tvd, D.total_variation, {}),
    ("ab(.5,.5)", D.alpha_beta_divergence_per_example, np_ab, D.alpha_beta_divergence, {"alpha": 0.5, "beta": 0.5}),
    ("ab(2,-.5)", D.alpha_beta_divergence_per_example, np_ab, D.alpha_beta_divergence, {"alpha": 2.0, "beta": -0.5}),
    ("ab(-.5,1.5)", D.alpha_beta_divergence_per_example, np_ab, D.alpha_beta_divergence, {"alpha": -0.5, "beta": 1.5}),
    ("ab(.7,-.7)", D.alpha_beta_divergence_per_example, np_ab, D.alpha_beta_divergence, {"alpha": 0.7, "beta": -0.7}),
    ("ab(.5,0)", D.alpha_beta_divergence_per_example, np_ab, D.alpha_beta_divergence, {"alpha": 0.5, "beta": 0.0}),
    ("ab(0,2)", D.alpha_beta_divergence_per_example, np_ab, D.alpha_beta_divergence, {"alpha": 0.0, "beta": 2.0}),
    ("ab(0,0)", D.alpha_beta_divergence_per_example, np_ab, D.alpha_beta_divergence, {"alpha": 0.0, "beta": 0.0}),
]
IDS = [c[0] for c in CASES]


# ----- reference values -----

@pytest.mark.parametrize("name,fn,ref,_,kw", CASES, ids=IDS)
def test_matches_numpy_reference(name, fn, ref, _, kw):
    zs, zt = rand_logits(0, SHAPE), rand_logits(1, SHAPE)
    np.testing.assert_allclose(fn(zs, zt, temperature=T, **kw), ref(zs, zt, T, **kw), rtol=2e-5, atol=1e-6)


def test_reduction_mask_weights_on_sequence_shaped_logits():
    fn, ref = D.js_divergence, np_js
    zs, zt = rand_logits(2, (2, 2, 7)), rand_logits(3, (2, 2, 7))
    per = ref(zs, zt, T)
    mask = np.array([[1, 1], [0, 1]], bool)
    w = np.arange(1.0, 5.0).reshape(2, 2)
    np.testing.assert_allclose(fn(zs, zt, temperature=T, mask=mask), per[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(fn(zs, zt, temperature=T, weights=w), (w * per).sum() / w.sum(), rtol=1e-5)
    np.testing.assert_allclose(fn(zs, zt, temperature=T, reduction="sum"), per.sum(), rtol=1e-5)
    assert fn(zs, zt, reduction="none").shape == (2, 2)


def test_kl_per_example_is_forward_kl_with_target_first():
    zs, zt = rand_logits(4, SHAPE), rand_logits(5, SHAPE)
    np.testing.assert_allclose(D.kl_per_example(zt, zs, temperature=T), D.forward_kl_per_example(zs, zt, temperature=T))
    np.testing.assert_allclose(D.kl_divergence(zt, zs), D.forward_kl(zs, zt))


@pytest.mark.parametrize("tail", ["drop", "bucket"])
def test_sparse_matches_numpy(tail, k=3):
    zs, zt = rand_logits(6, SHAPE), rand_logits(7, SHAPE)
    idx, log_p = S.topk_teacher(zt, k, temperature=T)
    assert idx.shape == log_p.shape == (4, k) and log_p.dtype == jnp.float32
    np.testing.assert_allclose(log_p, np.take_along_axis(np_log_softmax(zt, T), np.asarray(idx), -1), rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(np.asarray(log_p), axis=-1) <= 0)  # sorted, most probable first
    got = S.sparse_forward_kl_per_example(zs, idx, log_p, temperature=T, tail=tail)
    np.testing.assert_allclose(got, np_sparse(zs, np.asarray(idx), log_p, T, tail), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("tail", ["drop", "bucket"])
def test_sparse_full_vocabulary_equals_dense_forward_kl(tail):
    zs, zt = rand_logits(8, SHAPE), rand_logits(9, SHAPE)
    idx, log_p = S.topk_teacher(zt, SHAPE[-1], temperature=T)
    np.testing.assert_allclose(
        S.sparse_forward_kl(zs, idx, log_p, temperature=T, tail=tail), D.forward_kl(zs, zt, temperature=T), rtol=1e-5
    )


def test_sparse_bucket_is_a_lower_bound_and_only_it_sees_the_tail():
    zs, zt = rand_logits(10, SHAPE), rand_logits(11, SHAPE)
    idx, log_p = S.topk_teacher(zt, 3)
    dense = np.asarray(D.forward_kl_per_example(zs, zt))
    assert np.all(np.asarray(S.sparse_forward_kl_per_example(zs, idx, log_p, tail="bucket")) <= dense + 1e-6)
    # Moving student mass between non-top-k classes changes neither tail form.
    outside = np.ones(SHAPE, bool)
    np.put_along_axis(outside, np.asarray(idx), False, -1)
    zs2 = zs.copy()
    for i in range(SHAPE[0]):
        cols = np.where(outside[i])[0]
        zs2[i, cols] = np.log(np.exp(zs[i, cols]).sum()) - np.log(len(cols))  # same tail mass, spread evenly
    for tail in ("drop", "bucket"):
        np.testing.assert_allclose(
            S.sparse_forward_kl(zs2, idx, log_p, tail=tail), S.sparse_forward_kl(zs, idx, log_p, tail=tail), rtol=1e-5
        )
    # Changing the student's total tail mass moves "bucket" but not "drop" (renormalized over K).
    zs3 = np.where(outside, zs + 2.0, zs).astype(np.float32)
    np.testing.assert_allclose(S.sparse_forward_kl(zs3, idx, log_p), S.sparse_forward_kl(zs, idx, log_p), rtol=1e-5)
    assert float(S.sparse_forward_kl(zs3, idx, log_p, tail="bucket")) > float(S.sparse_forward_kl(zs, idx, log_p, tail="bucket")) + 0.1


# ----- properties -----

_PROP_IDX = np.array([[0, 2, 4], [5, 1, 3], [2, 3, 0]], np.int32)
PROP_FNS = [
    functools.partial(fn, temperature=1.5, **kw)
    for name, _, _, fn, kw in CASES
] + [
    # A fixed stored subset K rather than top_k(t): top-k selection among (near-)ties is not shift invariant.
    lambda s, t, tail=tail: S.sparse_forward_kl(
        s, _PROP_IDX, jnp.take_along_axis(log_softmax(t, 1.5), _PROP_IDX, -1), temperature=1.5, tail=tail
    )
    for tail in ("drop", "bucket")
]
_all = jax.jit(lambda s, t: jnp.stack([f(s, t) for f in PROP_FNS]))

logits = hnp.arrays(np.float32, (3, 6), elements=st.floats(-20, 20, width=32, allow_nan=False))


@settings(max_examples=30, deadline=None)
@given(zs=logits, zt=logits, shift=st.floats(-30, 30))
def test_nonnegative_and_invariant_to_per_row_shift(zs, zt, shift):
    values = np.asarray(_all(zs, zt))
    assert np.all(np.isfinite(values))
    assert np.all(values >= -1e-5 * (1 + np.abs(values)))
    row_shift = np.float32(shift) * np.array([[1.0], [-0.5], [0.25]], np.float32)
    shifted = np.asarray(_all(zs + row_shift, zt - np.float32(shift)))
    np.testing.assert_allclose(shifted, values, rtol=2e-3, atol=2e-3)


@settings(max_examples=25, deadline=None)
@given(z=logits, shift=st.floats(-10, 10))
def test_zero_on_equal_distributions(z, shift):
    values = np.asarray(_all(z, z + np.float32(shift)))
    np.testing.assert_allclose(values, 0.0, atol=1e-4)


# ----- limits -----

def test_gjsd_endpoints_are_forward_and_reverse_kl():
    zs, zt = rand_logits(12, SHAPE), rand_logits(13, SHAPE)
    np.testing.assert_allclose(D.generalized_jsd(zs, zt, beta=0.0, temperature=T), D.forward_kl(zs, zt, temperature=T))
    np.testing.assert_allclose(D.generalized_jsd(zs, zt, beta=1.0, temperature=T), D.reverse_kl(zs, zt, temperature=T))
    np.testing.assert_allclose(D.generalized_jsd(zs, zt, beta=0.5), D.js_divergence(zs, zt), rtol=1e-6)
    # A traced beta (inside jit) takes the same branches.
    f = jax.jit(lambda b: D.generalized_jsd(zs, zt, beta=b, temperature=T))
    for b in (0.0, 0.3, 1.0):
        np.testing.assert_allclose(f(b), D.generalized_jsd(zs, zt, beta=b, temperature=T), rtol=1e-5)


def test_gjsd_small_beta_limit():
    # JSD_b = b KL(pT||pS) + b^2/2 chi^2(pT||pS) + O(b^2) ... so JSD_b / b -> KL(pT||pS) as b -> 0, and
    # JSD_b / (1 - b) -> KL(pS||pT) as b -> 1 (why TRL's endpoint special cases are forward/reverse KL).
    zs, zt = rand_logits(14, SHAPE, 1.0), rand_logits(15, SHAPE, 1.0)
    fkl, rkl = np_fkl(zs, zt, T), np_rkl(zs, zt, T)
    for b in (1e-2, 1e-3):
        got = np.asarray(D.generalized_jsd_per_example(zs, zt, beta=b, temperature=T))
        np.testing.assert_allclose(got, np_gjsd(zs, zt, T, b), rtol=1e-3)  # float32 vs float64 at the same beta
        np.testing.assert_allclose(got / b, fkl, rtol=20 * b)
        got = np.asarray(D.generalized_jsd_per_example(zs, zt, beta=1 - b, temperature=T))
        np.testing.assert_allclose(got, np_gjsd(zs, zt, T, 1 - b), rtol=1e-3)
        np.testing.assert_allclose(got / b, rkl, rtol=20 * b)
    errors = [np.abs(np_gjsd(zs, zt, T, b) / b - fkl).max() for b in (1e-1, 1e-2, 1e-3, 1e-4)]
    assert all(e2 < e1 / 5 for e1, e2 in zip(errors, errors[1:]))  # O(b) convergence


def test_gjsd_beta_weights_the_teacher_not_the_student():
    # The swapped-beta bug (TRL PR #3043): the mixture must be beta*pT + (1-beta)*pS.
    zs, zt = rand_logits(34, SHAPE, 3.0), rand_logits(35, SHAPE, 3.0)
    beta = 0.1
    pt, ps = np_probs(zt), np_probs(zs)
    right = beta * np_kl(pt, beta * pt + (1 - beta) * ps) + (1 - beta) * np_kl(ps, beta * pt + (1 - beta) * ps)
    swapped = beta * np_kl(pt, beta * ps + (1 - beta) * pt) + (1 - beta) * np_kl(ps, beta * ps + (1 - beta) * pt)
    assert np.all(np.abs(right - swapped) > 0.1 * np.abs(right))
    got = D.generalized_jsd_per_example(zs, zt, beta=beta)
    np.testing.assert_allclose(got, right, rtol=1e-5)
    # and small beta is close to forward KL / beta-scaled, not reverse KL
    np.testing.assert_allclose(D.generalized_jsd(zs, zt, beta=1e-3) / 1e-3, np_kl(pt, ps).mean(), rtol=0.05)
    assert abs(np_kl(pt, ps).mean() - np_kl(ps, pt).mean()) > 0.2


def test_skew_limits():
    zs, zt = rand_logits(16, SHAPE), rand_logits(17, SHAPE)
    kw = {"temperature": T}
    np.testing.assert_allclose(D.skew_kl(zs, zt, alpha=0.0, **kw), D.forward_kl(zs, zt, **kw), rtol=1e-6)
    np.testing.assert_allclose(D.skew_reverse_kl(zs, zt, alpha=0.0, **kw), D.reverse_kl(zs, zt, **kw), rtol=1e-6)
    np.testing.assert_allclose(D.skew_kl_per_example(zs, zt, alpha=1.0, **kw), 0.0, atol=1e-7)
    np.testing.assert_allclose(D.skew_reverse_kl_per_example(zs, zt, alpha=1.0, **kw), 0.0, atol=1e-7)
    # alpha weights the teacher in SKL and the student in SRKL (FORMULAS.md 14b, distillm/losses.py)
    pt, ps = np_probs(zt, T), np_probs(zs, T)
    np.testing.assert_allclose(D.skew_kl_per_example(zs, zt, alpha=0.2, **kw), np_kl(pt, 0.2 * pt + 0.8 * ps), rtol=1e-5)
    np.testing.assert_allclose(D.skew_reverse_kl_per_example(zs, zt, alpha=0.2, **kw), np_kl(ps, 0.8 * pt + 0.2 * ps), rtol=1e-5)


def test_skew_kl_gradient_matches_distillm_cross_entropy_form():
    # DistiLLM's skewed_forward_kl is -sum pT log(a pT + (1-a) pS) (token mean); it differs from the KL form
    # by H(pT), a constant in the student, so the student gradients agree.
    zs, zt = jnp.asarray(rand_logits(18, SHAPE)), jnp.asarray(rand_logits(19, SHAPE))
    a = 0.1

    def distillm_ce(s):
        pt, ps = jax.nn.softmax(zt / T), jax.nn.softmax(s / T)
        return jnp.mean(-jnp.sum(pt * jnp.log(a * pt + (1 - a) * ps), axis=-1))

    g_kl = jax.jit(jax.grad(lambda s: D.skew_kl(s, zt, alpha=a, temperature=T)))(zs)
    np.testing.assert_allclose(g_kl, jax.jit(jax.grad(distillm_ce))(zs), rtol=1e-4, atol=1e-7)
    pt = np_probs(zt, T)
    entropy = -(pt * np.log(pt)).sum(-1).mean()
    np.testing.assert_allclose(jax.jit(distillm_ce)(zs) - D.skew_kl(zs, zt, alpha=a, temperature=T), entropy, rtol=1e-5)


def test_ab_limits():
    zs, zt = rand_logits(20, SHAPE, 1.5), rand_logits(21, SHAPE, 1.5)
    kw = {"temperature": T}
    fkl, rkl = np_fkl(zs, zt, T), np_rkl(zs, zt, T)
    # exact limiting cases of Cichocki et al. (2011): (1, 0) is KL(P||Q), (0, 1) is KL(Q||P)
    np.testing.assert_allclose(D.alpha_beta_divergence_per_example(zs, zt, alpha=1.0, beta=0.0, **kw), fkl, rtol=1e-5)
    np.testing.assert_allclose(D.alpha_beta_divergence_per_example(zs, zt, alpha=0.0, beta=1.0, **kw), rkl, rtol=1e-5)
    # approaching (1, 0) through the general formula: error O(beta), accurate in float32 even at beta = 1e-5
    errors = []
    for b in (1e-2, 1e-3, 1e-4, 1e-5):
        got = np.asarray(D.alpha_beta_divergence_per_example(zs, zt, alpha=1.0, beta=b, **kw))
        errors.append(np.abs(got - fkl).max())
        np.testing.assert_allclose(got, np_ab(zs, zt, T, 1.0, b), rtol=1e-4)
    assert all(e2 < e1 / 5 for e1, e2 in zip(errors, errors[1:])) and errors[-1] < 1e-4
    # the other limiting cases: accurate next to the limit, and the limit formulas are its continuation.
    # (Next to alpha = beta = 0 float32 cancellation costs ~1e-7/|alpha|, hence the larger offset there.)
    for (a, b), (a0, b0), eps in [
        ((0.5, 1e-4), (0.5, 0.0), 1e-4),
        ((1e-4, 2.0), (0.0, 2.0), 1e-4),
        ((0.7, -0.7 + 1e-4), (0.7, -0.7), 1e-4),
        ((1e-2, 1e-2), (0.0, 0.0), 1e-2),
    ]:
        near = np.asarray(D.alpha_beta_divergence_per_example(zs, zt, alpha=a, beta=b, **kw))
        np.testing.assert_allclose(near, np_ab(zs, zt, T, a, b), rtol=1e-4)
        np.testing.assert_allclose(near, np_ab(zs, zt, T, a0, b0), rtol=50 * eps)
    # (1, 1): half the squared Euclidean distance
    np.testing.assert_allclose(
        D.alpha_beta_divergence_per_example(zs, zt, alpha=1.0, beta=1.0, **kw),
        0.5 * ((np_probs(zt, T) - np_probs(zs, T)) ** 2).sum(-1), rtol=1e-4,
    )


def test_ab_zero_iff_equal():
    zs, zt = rand_logits(22, SHAPE), rand_logits(23, SHAPE)
    for a, b in [(0.5, 0.5), (1.0, 0.0), (0.7, -0.7), (0.0, 0.0), (2.0, -0.5)]:
        assert np.all(np.asarray(D.alpha_beta_divergence_per_example(zs, zt, alpha=a, beta=b)) > 1e-3)
        np.testing.assert_allclose(D.alpha_beta_divergence_per_example(zt - 1.0, zt, alpha=a, beta=b), 0.0, atol=1e-6)


# ----- gradients, jit, dtypes -----

GRAD_FNS = [(n, functools.partial(fn, temperature=T, **kw)) for n, _, _, fn, kw in CASES] + [
    (f"sparse-{tail}", lambda s, t, tail=tail, **kw: S.sparse_forward_kl(s, *S.topk_teacher(t, 3, temperature=T), temperature=T, tail=tail, **kw))
    for tail in ("drop", "bucket")
]


@pytest.mark.parametrize("name,fn", GRAD_FNS, ids=[g[0] for g in GRAD_FNS])
def test_gradients_match_finite_differences(name, fn):
    zs = jnp.asarray(rand_logits(24, SHAPE, 1.0))
    zt = jnp.asarray(rand_logits(25, SHAPE, 1.0))
    check_grads(lambda s: fn(s, zt), (zs,), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)
    if not name.startswith("sparse"):
        check_grads(lambda t: fn(zs, t), (zt,), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


def test_jit_bfloat16_inputs_compute_in_float32():
    zs, zt = rand_logits(26, SHAPE), rand_logits(27, SHAPE)
    bs, bt = jnp.asarray(zs, jnp.bfloat16), jnp.asarray(zt, jnp.bfloat16)
    every = jax.jit(lambda s, t: [fn(s, t) for _, fn in GRAD_FNS])  # one compilation for all
    outs = every(bs, bt)
    refs = [fn(jnp.asarray(bs, jnp.float32), jnp.asarray(bt, jnp.float32)) for _, fn in GRAD_FNS]
    for (name, _), out, ref in zip(GRAD_FNS, outs, refs):
        assert out.dtype == jnp.float32, name
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-7, err_msg=name)
        assert float(out) >= 0.0, name  # no negative JSD from low-precision inputs


# ----- masked vocabulary (-inf) -----

def _masked_logits():
    zs, zt = rand_logits(28, SHAPE), rand_logits(29, SHAPE)
    zs[:, -2:] = -np.inf  # padded vocabulary: masked on both sides
    zt[:, -2:] = -np.inf
    zt[0, 1] = -np.inf    # teacher alone excludes a class
    zs[1, 2] = -np.inf    # student alone excludes a class
    zt[2, 3] = zs[2, 3] = -np.inf
    return zs, zt


@pytest.mark.parametrize("name,fn", GRAD_FNS, ids=[g[0] for g in GRAD_FNS])
def test_neg_inf_logits_give_finite_values_and_gradients(name, fn):
    zs, zt = _masked_logits()
    value, (gs, gt) = jax.value_and_grad(fn, argnums=(0, 1))(jnp.asarray(zs), jnp.asarray(zt))
    assert np.isfinite(value) and np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))
    assert np.all(np.asarray(gs)[~np.isfinite(zs)] == 0)  # excluded classes get no gradient


@pytest.mark.parametrize("name,fn,ref,_,kw", CASES, ids=IDS)
def test_neg_inf_values_follow_the_documented_convention(name, fn, ref, _, kw):
    zs, zt = _masked_logits()
    # exact divergence with zero-mass entries, +inf KL terms dropped (the NumPy reference implements this)
    np.testing.assert_allclose(fn(zs, zt, temperature=T, **kw), ref(zs, zt, T, **kw), rtol=2e-5, atol=1e-6)
    # masked on both sides: the divergence over the remaining entries
    a, b = zs[[0, 2]], zt[[0, 2]]
    a[0, 1] = b[0, 1] = -np.inf  # make the row-0 mask two-sided as well
    both = np.asarray(fn(a, b, temperature=T, **kw))
    keep = np.isfinite(a) & np.isfinite(b)
    for i in range(2):  # the plain formula on the kept classes only (no -inf left there)
        sub = ref(a[i][keep[i]][None], b[i][keep[i]][None], T, **kw)
        np.testing.assert_allclose(both[i], sub[0], rtol=2e-5, atol=1e-6)


def test_neg_inf_one_sided_conventions_spelled_out():
    zs, zt = rand_logits(36, SHAPE), rand_logits(37, SHAPE)
    zs[:, 2] = -np.inf  # the student alone excludes class 2
    pt, ps = np_probs(zt), np_probs(zs)
    # forward KL drops the +inf term of class 2 (DistiLLM's convention); JS and TV count it exactly
    keep = [0, 1, 3, 4, 5, 6]
    fkl = (pt[:, keep] * np.log(pt[:, keep] / ps[:, keep])).sum(-1)
    np.testing.assert_allclose(D.forward_kl_per_example(zs, zt), fkl, rtol=1e-5)
    m = 0.5 * (pt + ps)
    js = 0.5 * (pt * np.log(pt / m)).sum(-1) + 0.5 * np.where(ps > 0, ps * np.log(np.maximum(ps, 1e-300) / m), 0).sum(-1)
    np.testing.assert_allclose(D.js_divergence_per_example(zs, zt), js, rtol=1e-5)
    np.testing.assert_allclose(D.total_variation_per_example(zs, zt), 0.5 * np.abs(pt - ps).sum(-1), rtol=1e-5)
    # reverse KL where the teacher alone excludes class 2: that +inf term is dropped, SRKL counts it
    rkl = (ps[:, keep] * np.log(ps[:, keep] / pt[:, keep])).sum(-1)
    np.testing.assert_allclose(D.reverse_kl_per_example(zt, zs), (pt[:, keep] * np.log(pt[:, keep] / ps[:, keep])).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(D.reverse_kl_per_example(zs, zt), rkl, rtol=1e-5)  # (no masked class in ps)
    m = 0.8 * ps + 0.2 * pt  # SRKL(student=zt, teacher=zs), alpha=0.2: KL(p_zt || 0.8 p_zs + 0.2 p_zt)
    np.testing.assert_allclose(D.skew_reverse_kl_per_example(zt, zs, alpha=0.2), (pt * np.log(pt / m)).sum(-1), rtol=1e-5)


def test_sparse_with_neg_inf_teacher_and_student():
    zs, zt = rand_logits(30, SHAPE), rand_logits(31, SHAPE)
    zt[0, 2:] = -np.inf  # teacher has only 2 finite classes, k = 3 picks a -inf one
    zs[1, :] = -np.inf
    zs[1, 0] = 1.0
    idx, log_p = S.topk_teacher(zt, 3)
    assert np.sum(~np.isfinite(np.asarray(log_p))) == 1
    for tail in ("drop", "bucket"):
        value, g = jax.value_and_grad(lambda s: S.sparse_forward_kl(s, idx, log_p, tail=tail))(jnp.asarray(zs))
        assert np.isfinite(value) and np.all(np.isfinite(g))
        np.testing.assert_allclose(
            S.sparse_forward_kl_per_example(zs, idx, log_p, tail=tail), np_sparse(zs, np.asarray(idx), log_p, 1.0, tail), rtol=1e-5, atol=1e-7
        )


@pytest.mark.parametrize("name,fn", GRAD_FNS, ids=[g[0] for g in GRAD_FNS])
def test_all_neg_inf_rows_and_all_masked_batch(name, fn):
    zs, zt = rand_logits(32, SHAPE), rand_logits(33, SHAPE)
    zs[0] = zt[0] = -np.inf
    zt[1] = -np.inf  # the teacher has no mass in row 1 at all
    value, g = jax.value_and_grad(fn)(jnp.asarray(zs), jnp.asarray(zt))
    assert np.isfinite(value) and np.all(np.isfinite(g))
    mask = np.zeros(SHAPE[0], bool)
    value, g = jax.value_and_grad(lambda s: fn(s, jnp.asarray(zt), mask=mask))(jnp.asarray(zs))
    assert float(value) == 0.0 and np.all(np.asarray(g) == 0)


# ----- bad input -----

@pytest.mark.parametrize("name,_,__,fn,kw", CASES, ids=IDS)
def test_bad_temperature_and_shapes_raise(name, _, __, fn, kw):
    z = np.zeros((2, 3), np.float32)
    for t in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            fn(z, z, temperature=t, **kw)
    with pytest.raises(ValueError, match="number of classes"):
        fn(z, np.zeros((2, 4), np.float32), **kw)
    with pytest.raises(ValueError, match="same shape"):
        fn(z, np.zeros((3, 3), np.float32), **kw)


def test_bad_hyperparameters_raise():
    z = np.zeros((2, 3), np.float32)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"beta must lie in \[0.0, 1.0\], got beta="):
            D.generalized_jsd(z, z, beta=bad)
        with pytest.raises(ValueError, match="alpha must lie in"):
            D.skew_kl(z, z, alpha=bad)
        with pytest.raises(ValueError, match="alpha must lie in"):
            D.skew_reverse_kl(z, z, alpha=bad)
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        D.alpha_beta_divergence(z, z, alpha=float("nan"), beta=1.0)
    with pytest.raises(ValueError, match="beta must be a finite number"):
        D.alpha_beta_divergence(z, z, alpha=1.0, beta=float("inf"))
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(lambda a: D.alpha_beta_divergence(z, z, alpha=a, beta=1.0))(0.5)
    with pytest.raises(ValueError, match="reduction"):
        D.js_divergence(z, z, reduction="avg")


def test_bad_sparse_input_raises():
    zs = rand_logits(38, SHAPE)
    with pytest.raises(ValueError, match=r"k=8 is larger than the vocabulary \(7"):
        S.topk_teacher(zs, 8)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        S.topk_teacher(zs, 0)
    with pytest.raises(ValueError, match="temperature"):
        S.topk_teacher(zs, 2, temperature=0.0)
    idx, lp = S.topk_teacher(zs, 2)
    with pytest.raises(ValueError, match="k=8 is larger than the vocabulary"):
        S.sparse_forward_kl(zs, np.zeros((4, 8), np.int32), np.zeros((4, 8), np.float32))
    good = np.array([[0, 1], [1, 2], [3, 4], [5, 6]])
    for bad, match in [((0, 7), "top-k index 7 is outside the vocabulary"), ((0, -1), "top-k index -1 is outside"), ((2, 2), "repeated index")]:
        idx_bad = good.copy()
        idx_bad[1] = bad
        with pytest.raises(ValueError, match=match):
            S.sparse_forward_kl(zs, idx_bad, lp)
    with pytest.raises(ValueError, match="same shape"):
        S.sparse_forward_kl(zs, idx, lp[:, :1])
    with pytest.raises(ValueError, match="student_logits.shape"):
        S.sparse_forward_kl(np.zeros((3, 7), np.float32), idx, lp)
    with pytest.raises(ValueError, match="integers"):
        S.sparse_forward_kl(zs, np.asarray(idx, np.float32), lp)
    with pytest.raises(ValueError, match="tail must be 'drop' or 'bucket'"):
        S.sparse_forward_kl(zs, idx, lp, tail="uniform")
    with pytest.raises(ValueError, match="temperature"):
        S.sparse_forward_kl(zs, idx, lp, temperature=-2.0)


# ----- method factories -----

def fake_inputs(seed=0, batch=None):
    zs, zt = rand_logits(seed, SHAPE), rand_logits(seed + 1, SHAPE)
    return LossInputs(
        student=Outputs(jnp.asarray(zs), {}, {}),
        teacher=Outputs(jnp.asarray(zt), {}, {}),
        batch=batch if batch is not None else {"mask": np.array([1, 1, 0, 1], bool)},
        step=jnp.asarray(0, jnp.int32),
    )


METHODS = [
    ("fkl", M.forward_kl(temperature=2.0), lambda s, t, m: D.forward_kl(s, t, temperature=2.0, mask=m)),
    ("rkl", M.reverse_kl(temperature=2.0), lambda s, t, m: D.reverse_kl(s, t, temperature=2.0, mask=m)),
    ("jsd", M.jsd(), lambda s, t, m: D.js_divergence(s, t, mask=m)),
    ("gjsd", M.gjsd(beta=0.9), lambda s, t, m: D.generalized_jsd(s, t, beta=0.9, mask=m)),
    ("skl", M.skl(), lambda s, t, m: D.skew_kl(s, t, alpha=0.1, mask=m)),
    ("srkl", M.srkl(alpha=0.2), lambda s, t, m: D.skew_reverse_kl(s, t, alpha=0.2, mask=m)),
    ("tvd", M.tvd(), lambda s, t, m: D.total_variation(s, t, mask=m)),
    ("ab", M.ab(alpha=0.5, beta=0.5), lambda s, t, m: D.alpha_beta_divergence(s, t, alpha=0.5, beta=0.5, mask=m)),
    ("sparse_kd", M.sparse_kd(k=3, tail="bucket", temperature=2.0),
     lambda s, t, m: S.sparse_forward_kl(s, *S.topk_teacher(t, 3, temperature=2.0), temperature=2.0, tail="bucket", mask=m)),
]


@pytest.mark.parametrize("name,method,expected", METHODS, ids=[m[0] for m in METHODS])
def test_methods_compute_their_loss_on_detached_teacher(name, method, expected):
    assert method.name == name and method.needs_teacher and method.weight == 1.0
    inputs = fake_inputs()
    vars = method.init(jax.random.PRNGKey(0), inputs)
    value, aux = method.loss(vars, inputs, jax.random.PRNGKey(1))
    ref = expected(inputs.student.logits, inputs.teacher.logits, inputs.batch["mask"])
    np.testing.assert_allclose(value, ref, rtol=1e-6)
    assert dict(aux.metrics) == {}

    def through_teacher(zt):
        x = LossInputs(inputs.student, Outputs(zt, {}, {}), inputs.batch, inputs.step)
        return method.loss(vars, x, jax.random.PRNGKey(1))[0]

    assert np.all(np.asarray(jax.grad(through_teacher)(inputs.teacher.logits)) == 0)


def test_sparse_kd_offline_reads_stored_topk():
    inputs = fake_inputs()
    idx, lp = S.topk_teacher(inputs.teacher.logits, 4, temperature=2.0)
    batch = {"mask": inputs.batch["mask"], "topk_idx": idx, "topk_lp": lp}
    offline = M.sparse_kd(k=3, temperature=2.0, indices_key="topk_idx", log_probs_key="topk_lp")
    assert not offline.needs_teacher and offline.batch_keys == ("topk_idx", "topk_lp")
    x = LossInputs(inputs.student, None, batch, inputs.step)
    value, _ = offline.loss(offline.init(jax.random.PRNGKey(0), x), x, jax.random.PRNGKey(1))
    online = M.sparse_kd(k=3, temperature=2.0)
    expected, _ = online.loss(online.init(jax.random.PRNGKey(0), inputs), inputs, jax.random.PRNGKey(1))
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="k=5 is larger than the 4 stored"):
        M.sparse_kd(k=5, indices_key="topk_idx", log_probs_key="topk_lp").loss(None, x, jax.random.PRNGKey(1))


def test_method_factories_validate_arguments():
    with pytest.raises(ValueError, match="temperature"):
        M.reverse_kl(temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        M.gjsd(beta=1.2)
    with pytest.raises(ValueError, match="alpha"):
        M.skl(alpha=-0.1)
    with pytest.raises(ValueError, match="alpha"):
        M.srkl(alpha=2.0)
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        M.ab(alpha="one", beta=1.0)
    with pytest.raises(ValueError, match="tail"):
        M.sparse_kd(k=3, tail="zero")
    with pytest.raises(ValueError, match="needs k"):
        M.sparse_kd()
    with pytest.raises(ValueError, match="both indices_key and log_probs_key"):
        M.sparse_kd(k=3, indices_key="i")
    with pytest.raises(ValueError, match="needs a teacher"):
        inputs = fake_inputs()
        M.jsd().loss(None, LossInputs(inputs.student, None, inputs.batch, inputs.step), jax.random.PRNGKey(0))
