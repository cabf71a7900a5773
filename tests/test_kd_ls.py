"""Logit standardization (jaxkd/losses/logit/kd_ls.py, jaxkd/methods/logit/kd_ls.py): ``standardize_logits`` against the
official ``normalize`` (unbiased std, eps added outside the square root) written in NumPy, its documented
treatment of constant and nearly constant rows and of excluded (-inf) entries; ``kd_ls`` against NumPy,
its scale invariance, and the method.

Gradients, bfloat16, jit == eager, classes excluded on both sides, NaN/+inf propagation, nonnegativity
and shift invariance are checked in tests/test_loss_contract.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxkd import losses, methods
from jaxkd.methods import LossInputs
from jaxkd.models import Outputs

from tests.numpy_reference import np_kl, np_softmax, np_standardize, rand_logits


def np_kd_ls(zs, zt, tau):
    return tau**2 * np_kl(np_softmax(np_standardize(zt) / tau), np_softmax(np_standardize(zs) / tau))


# ----- standardize_logits -----

def test_rows_with_a_real_spread_follow_the_official_formula():
    # float64, so that the comparison is exact enough to tell the formula apart: a row with std 1e-5
    # makes eps = 1e-7 a 1% effect, which distinguishes eps + std from sqrt(var + eps), and C = 5
    # distinguishes the unbiased std from the biased one by 12%.
    rng = np.random.default_rng(7)
    z = np.stack([3.0 * rng.normal(size=5), 1.0 + 1e-5 * rng.normal(size=5), 100.0 + rng.normal(size=5)])
    with jax.enable_x64(True):
        out = np.asarray(losses.standardize_logits(z))
    np.testing.assert_allclose(out, np_standardize(z), rtol=1e-9)


def test_excluded_entries_stay_excluded_and_out_of_the_statistics():
    z = rand_logits(7)
    z[1, [0, 3]] = -np.inf
    out = np.asarray(losses.standardize_logits(z))
    assert np.all(np.isneginf(out[1, [0, 3]]))
    np.testing.assert_allclose(out[np.isfinite(z)], np_standardize(z)[np.isfinite(z)], rtol=1e-5, atol=1e-6)


def test_constant_and_nearly_constant_rows_map_to_exactly_zero_with_zero_gradient():
    # The official formula would turn a row that varies by rounding noise into O(1) logits (and a 1/eps
    # gradient); here such a row is constant: all zeros, i.e. a uniform distribution after the softmax.
    noise = 5e-7 * np.random.default_rng(8).normal(size=7)  # a few float32 ulps of 3.0
    rows = np.stack([np.full(7, 3.0), 3.0 + noise, np.full(7, -250.0)]).astype(np.float32)
    assert np.ptp(rows[1]) > 0  # not exactly constant in float32
    single = np.array([[-np.inf, 2.0, -np.inf]], np.float32)  # one kept entry: std 0
    np.testing.assert_array_equal(losses.standardize_logits(rows), np.zeros_like(rows))
    np.testing.assert_array_equal(losses.standardize_logits(single), [[-np.inf, 0.0, -np.inf]])
    w = np.random.default_rng(9).normal(size=7).astype(np.float32)
    g = jax.jit(jax.grad(lambda z: jnp.sum(w * losses.standardize_logits(z))))(rows)
    assert np.all(np.asarray(g) == 0)
    # So KD-LS between a noisy-constant student and a constant teacher is exactly 0, not O(1).
    assert float(losses.kd_ls(rows[1:2], rows[0:1] + 1.0)) == 0.0


# ----- kd_ls -----

def test_kd_ls_matches_numpy():
    zs, zt = rand_logits(8), rand_logits(9)
    np.testing.assert_allclose(losses.kd_ls(zs, zt, temperature=2.0, reduction="none"), np_kd_ls(zs, zt, 2.0),
                               rtol=1e-5)


_kd_ls = jax.jit(lambda s, t: losses.kd_ls(s, t, temperature=2.0, reduction="none"))
rows = hnp.arrays(np.float32, (3, 6), elements=st.floats(-10, 10, width=32))


@settings(max_examples=25)
@given(z=rows, zt=rows, scale=st.floats(0.2, 5.0), shift=st.floats(-10, 10))
def test_kd_ls_ignores_a_positive_affine_map_of_either_side(z, zt, scale, shift):
    # Standardization removes each row's mean and std (up to eps, negligible unless a row is almost constant).
    if np.min(np.std(z, -1)) < 1e-2 or np.min(np.std(zt, -1)) < 1e-2:
        return
    moved = _kd_ls(np.float32(scale) * z + np.float32(shift), zt / np.float32(scale))
    np.testing.assert_allclose(moved, _kd_ls(z, zt), atol=1e-3, rtol=1e-3)


@settings(max_examples=25)
@given(z=rows)
def test_kd_ls_is_zero_when_the_student_equals_the_teacher(z):
    assert np.all(np.abs(np.asarray(_kd_ls(z, z))) < 1e-4)


def test_bad_arguments_raise():
    z = np.zeros((2, 3), np.float32)
    for bad, match in [
        (lambda: losses.standardize_logits(z, eps=0.0), "eps"),
        (lambda: losses.kd_ls(z, z, eps=-1.0), "eps"),
        (lambda: losses.kd_ls(z, z, temperature=0.0), "temperature"),
        (lambda: losses.kd_ls(z, z, temperature=np.inf), "temperature"),
        (lambda: losses.kd_ls(z, np.zeros((2, 4))), "number of classes"),
        (lambda: methods.kd_ls(temperature=0.0), "temperature"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()


def test_method_matches_numpy_over_the_unmasked_examples():
    zs, zt = rand_logits(10), rand_logits(11)
    mask = np.array([1, 1, 0, 1, 1, 1], bool)
    inputs = LossInputs.of(Outputs(jnp.asarray(zs), {}, {}), Outputs(jnp.asarray(zt), {}, {}), {"mask": mask},
                        jnp.zeros((), jnp.int32))
    method = methods.kd_ls(temperature=3.0)
    value, _ = method.loss(method.init(jax.random.PRNGKey(0), inputs), inputs, jax.random.PRNGKey(1))
    np.testing.assert_allclose(value, np_kd_ls(zs, zt, 3.0)[mask].mean(), rtol=1e-5)
