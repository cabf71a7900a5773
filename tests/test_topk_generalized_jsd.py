"""Top-k generalized JSD / forward KL / reverse KL (jaxkd/losses/logit/topk_generalized_jsd.py) against a float64
NumPy transcription of TRL's ``generalized_jsd_loss(top_k=..., add_tail=...)`` (trl/experimental/iw_opd/
iw_opd_trainer.py: the support by β, the union de-duplicated in order, ``_add_tail_bucket``'s
``log(−expm1(logsumexp))``, ``_jsd_divergence`` with a support mask), the full-vocabulary limit, the
lower bound, the gradient of every support against float64 finite differences, argument checks, a
derandomized property, and the ``topk_reverse_kl`` / ``topk_generalized_jsd`` methods.

The contract (bfloat16, -inf classes, NaN propagation, jit) is checked in tests/test_loss_contract.py.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxkd import losses as S
from jaxkd import methods
from jaxkd.methods import LossInputs
from jaxkd.models import Outputs

from tests.numpy_reference import np_log_softmax, rand_logits

T = 1.6
SHAPE = (5, 9)
NONE = {"reduction": "none"}
logits = partial(rand_logits, shape=SHAPE, scale=2.0)


def np_trl_topk_gjsd(zs, zt, *, k, beta, temperature=1.0, add_tail=True, support=None):
    """TRL's IWOPDTrainer.generalized_jsd_loss(top_k=k, add_tail=...) per position (reduction='none', summed over
    the support), in NumPy float64. ``support`` overrides TRL's choice by β (jaxkd's explicit ``support=``)."""
    zs = np.asarray(zs, np.float64) / temperature
    zt = np.asarray(zt, np.float64) / temperature
    ls_full, lt_full = np_log_softmax(zs), np_log_softmax(zt)
    side = support or ("teacher" if beta == 0 else "student" if beta == 1 else "union")
    top = lambda z: np.argsort(-z, axis=-1, kind="stable")[..., :k]
    if side == "teacher":
        sup = top(zt)
        valid = np.ones(sup.shape, bool)
    elif side == "student":
        sup = top(zs)
        valid = np.ones(sup.shape, bool)
    else:  # concatenate teacher then student, mask later duplicates
        sup = np.concatenate([top(zt), top(zs)], -1)
        valid = np.ones(sup.shape, bool)
        for i in range(1, sup.shape[-1]):
            valid[..., i] &= ~((sup[..., i:i + 1] == sup[..., :i]) & valid[..., :i]).any(-1)
        sup = np.where(valid, sup, 0)
    ls = np.where(valid, np.take_along_axis(ls_full, sup, -1), -np.inf)
    lt = np.where(valid, np.take_along_axis(lt_full, sup, -1), -np.inf)

    def lse(x):
        m = x.max(-1, keepdims=True)
        return m + np.log(np.exp(x - m).sum(-1, keepdims=True))

    if add_tail:
        def add(lp):
            s = np.minimum(lse(lp), -1e-7)
            return np.concatenate([lp, np.log(-np.expm1(s))], -1)
        ls, lt, valid = add(ls), add(lt), np.concatenate([valid, np.ones(valid.shape[:-1] + (1,), bool)], -1)
    else:
        ls, lt = ls - lse(ls), lt - lse(lt)
    safe_s, safe_t = np.where(valid, ls, 0.0), np.where(valid, lt, 0.0)
    ps, pt = np.where(valid, np.exp(ls), 0.0), np.where(valid, np.exp(lt), 0.0)
    if beta == 0:
        terms = pt * (safe_t - safe_s)
    elif beta == 1:
        terms = ps * (safe_s - safe_t)
    else:
        mix = (1 - beta) * ps + beta * pt
        safe_m = np.where(valid, np.log(np.maximum(mix, np.finfo(np.float64).tiny)), 0.0)
        terms = beta * pt * (safe_t - safe_m) + (1 - beta) * ps * (safe_s - safe_m)
    return terms.sum(-1)


CONFIGS = [(beta, tail, support) for beta in (0.0, 0.3, 1.0) for tail in ("bucket", "drop")
           for support in ("auto", "teacher", "student", "union")]


@pytest.mark.parametrize("beta,tail,support", CONFIGS)
def test_matches_the_numpy_transcription_of_trl(beta, tail, support):
    zs, zt = logits(1), logits(2)
    got = S.topk_generalized_jsd(zs, zt, k=3, beta=beta, tail=tail, support=support, temperature=T, **NONE)
    want = np_trl_topk_gjsd(zs, zt, k=3, beta=beta, temperature=T, add_tail=tail == "bucket",
                            support=None if support == "auto" else support)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_full_support_is_the_dense_generalized_jsd_and_the_bucket_a_lower_bound(beta):
    zs, zt = logits(3), logits(4)
    dense = S.generalized_jsd(zs, zt, beta=beta, temperature=T, **NONE)
    for tail in ("bucket", "drop"):
        full = S.topk_generalized_jsd(zs, zt, k=SHAPE[-1], beta=beta, tail=tail, temperature=T, **NONE)
        np.testing.assert_allclose(full, dense, rtol=1e-5, atol=1e-7)
    for k in (1, 2, 4):
        bucket = S.topk_generalized_jsd(zs, zt, k=k, beta=beta, temperature=T, **NONE)
        assert np.all(np.asarray(bucket) <= np.asarray(dense) + 1e-6)  # data processing inequality
    # k = 1 with a tail bucket is not the trivial zero the renormalized form gives (TRL's reason for the tail).
    support = "teacher" if beta == 0.0 else "student"
    np.testing.assert_allclose(S.topk_generalized_jsd(zs, zt, k=1, beta=beta, tail="drop", support=support, **NONE),
                               0.0, atol=1e-7)
    assert np.all(np.asarray(S.topk_generalized_jsd(zs, zt, k=1, beta=beta, support=support, **NONE)) > 1e-4)


@pytest.mark.parametrize("beta,tail,support", [(1.0, "bucket", "auto"), (0.0, "bucket", "auto"),
                                               (0.3, "drop", "union"), (0.3, "bucket", "student"),
                                               (1.0, "drop", "auto")])
def test_gradient_matches_float64_finite_differences(beta, tail, support):
    zs, zt = logits(5).astype(np.float64), logits(6).astype(np.float64)
    w = np.linspace(0.5, 1.5, SHAPE[0])
    eps = 1e-6
    with jax.enable_x64(True):
        for arg in (0, 1):
            def f(x):
                a = (x, zt) if arg == 0 else (zs, x)
                return jnp.sum(w * S.topk_generalized_jsd(*a, k=3, beta=beta, tail=tail, support=support,
                                                          temperature=T, **NONE))
            x = zs if arg == 0 else zt
            grad = np.asarray(jax.grad(f)(x))
            assert grad.dtype == np.float64
            fd = np.zeros_like(x)
            for i in np.ndindex(x.shape):
                d = np.zeros_like(x)
                d[i] = eps
                fd[i] = (float(f(x + d)) - float(f(x - d))) / (2 * eps)
            np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8, err_msg=f"argument {arg}")


def test_excluded_classes_are_zero_mass_with_zero_gradients():
    zs, zt = logits(7), logits(8)
    zs[0, 3:] = -np.inf  # the student has 3 classes: its top-4 picks a -inf one
    zt[1, :] = -np.inf   # a teacher with no mass at all
    zt[1, 0] = 0.0
    for beta in (0.0, 0.3, 1.0):
        for tail in ("bucket", "drop"):
            value = S.topk_generalized_jsd(zs, zt, k=4, beta=beta, tail=tail, **NONE)
            assert np.all(np.isfinite(value)), (beta, tail)
            g = jax.grad(lambda s: S.topk_generalized_jsd(s, zt, k=4, beta=beta, tail=tail))(zs)
            assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[np.isneginf(zs)] == 0)
    np.testing.assert_allclose(S.topk_generalized_jsd(zs[2:], zt[2:], k=4, beta=0.3, **NONE),
                               np_trl_topk_gjsd(zs[2:], zt[2:], k=4, beta=0.3), rtol=2e-5, atol=1e-6)


@settings(max_examples=20, derandomize=True, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, SHAPE[-1]), beta=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
       tail=st.sampled_from(["bucket", "drop"]))
def test_nonnegative_zero_at_equality_and_shift_invariant(seed, k, beta, tail):
    zs, zt = logits(seed), logits(seed + 1)
    f = lambda s, t: np.asarray(S.topk_generalized_jsd(s, t, k=k, beta=beta, tail=tail, **NONE))
    value = f(zs, zt)
    assert np.all(value >= -1e-6)
    np.testing.assert_allclose(f(zs + 3.0, zt - 1.0), value, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(f(zt, zt), 0.0, atol=1e-6)


def test_bad_input_raises():
    zs, zt = logits(9), logits(10)
    for bad, match in [
        (dict(k=0), "k must be an integer >= 1"),
        (dict(k=10), r"k=10 is larger than the vocabulary \(9"),
        (dict(k=2.0), "k must be an integer"),
        (dict(k=2, beta=1.5), "beta"),
        (dict(k=2, support="both"), "support must be one of"),
        (dict(k=2, tail="uniform"), "tail must be one of"),
        (dict(k=2, temperature=0.0), "temperature"),
    ]:
        with pytest.raises(ValueError, match=match):
            S.topk_generalized_jsd(zs, zt, **bad)
    with pytest.raises(ValueError, match="number of classes"):
        S.topk_generalized_jsd(zs, zt[:, :5], k=2)
    with pytest.raises(ValueError, match="beta must be a concrete number"):
        jax.jit(lambda b: S.topk_generalized_jsd(zs, zt, k=2, beta=b))(0.5)


# ----- the methods -----

def run(method, zs, zt, mask):
    inputs = LossInputs.of(student=Outputs(jnp.asarray(zs), {}, {}), teacher=Outputs(jnp.asarray(zt), {}, {}),
                           batch={"mask": mask}, step=jnp.asarray(0, jnp.int32))
    value, _ = method.loss(method.init(jax.random.PRNGKey(0), inputs), inputs, jax.random.PRNGKey(1))
    return value


def test_methods_are_the_loss_over_the_unmasked_examples():
    zs, zt = logits(11), logits(12)
    mask = np.array([1, 0, 1, 1, 1], bool)
    want = np_trl_topk_gjsd(zs, zt, k=3, beta=1.0, temperature=2.0)[mask].mean()
    np.testing.assert_allclose(run(methods.topk_reverse_kl(k=3, temperature=2.0), zs, zt, mask), want, rtol=2e-5)
    want = np_trl_topk_gjsd(zs, zt, k=2, beta=0.4, temperature=2.0, add_tail=False)[mask].mean()
    method = methods.topk_generalized_jsd(k=2, beta=0.4, tail="drop", temperature=2.0)
    np.testing.assert_allclose(run(method, zs, zt, mask), want, rtol=2e-5)
    for bad, match in [(lambda: methods.topk_reverse_kl(), "needs k"), (lambda: methods.topk_reverse_kl(k=0), "k must"),
                       (lambda: methods.topk_generalized_jsd(k=2, beta=2.0), "beta"),
                       (lambda: methods.topk_generalized_jsd(k=2, support="x"), "support"),
                       (lambda: methods.topk_reverse_kl(k=2, tail="x"), "tail")]:
        with pytest.raises(ValueError, match=match):
            bad()
