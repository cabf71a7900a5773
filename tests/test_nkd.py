"""Normalized KD (jaxkd/losses/logit/nkd.py, jaxkd/methods/logit/nkd.py) against the official code's computation written
in NumPy (target and non-target parts), the ``form="kl"`` variant (same student gradient, value lower by
``γλ²·H(T̂)``), labels out of range inside jit, argument checks and the method's label masking.

Gradients (with the detached ``T_y``), bfloat16, jit == eager, classes excluded on both sides, NaN/+inf
propagation, nonnegativity and shift invariance are checked in tests/test_loss_contract.py.
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

from tests.numpy_reference import np_entropy, np_log_softmax, np_softmax, rand_logits


def np_nkd(zs, zt, y, temp, gamma):
    """yzd-v/cls_KD nkd.py per example: −T_y log S_y and −γλ² Σ_{i≠y} T̂_i log Ŝ_i (target column deleted)."""
    target, nontarget = [], []
    for n in range(zs.shape[0]):
        target.append(-np_softmax(zt[n])[y[n]] * np_log_softmax(zs[n])[y[n]])
        keep = np.arange(zs.shape[1]) != y[n]
        t_hat = np_softmax(zt[n][keep] / temp)
        nontarget.append(-gamma * temp**2 * np.sum(t_hat * np_log_softmax(zs[n][keep] / temp)))
    return np.array(target), np.array(nontarget)


def test_matches_the_official_code():
    zs, zt = rand_logits(14), rand_logits(15)
    y = np.array([4, 0, 3, 3, 2, 1], np.int32)
    target_ref, nontarget_ref = np_nkd(zs, zt, y, 3.0, 3.5)
    target, nontarget = losses.nkd_terms(zs, zt, y, temperature=3.0, gamma=3.5, reduction="none")
    np.testing.assert_allclose(target, target_ref, rtol=1e-5)
    np.testing.assert_allclose(nontarget, nontarget_ref, rtol=1e-5)
    np.testing.assert_allclose(losses.nkd(zs, zt, y, temperature=3.0, gamma=3.5), np.mean(target_ref + nontarget_ref),
                               rtol=1e-5)


def test_ce_and_kl_forms_have_the_same_student_gradient_and_differ_by_the_entropy():
    zs, zt = rand_logits(16), rand_logits(17)
    y = np.array([0, 1, 2, 3, 4, 0], np.int32)
    grad = lambda form: jax.grad(lambda s: losses.nkd(s, zt, y, temperature=2.0, gamma=1.5, form=form))(zs)
    np.testing.assert_allclose(grad("ce"), grad("kl"), atol=1e-6)
    h = [np_entropy(np_softmax(np.delete(zt[n], y[n]) / 2.0)) for n in range(6)]
    diff = (losses.nkd(zs, zt, y, temperature=2.0, form="ce", reduction="none")
            - losses.nkd(zs, zt, y, temperature=2.0, form="kl", reduction="none"))
    np.testing.assert_allclose(diff, 1.5 * 4.0 * np.array(h), rtol=1e-4)


_nontarget_kl = jax.jit(lambda s, t, y: losses.nkd_terms(s, t, y, temperature=2.0, form="kl", reduction="none")[1])


@settings(max_examples=25)
@given(z=hnp.arrays(np.float32, (3, 6), elements=st.floats(-10, 10, width=32)),
       y=hnp.arrays(np.int32, (3,), elements=st.integers(0, 5)))
def test_kl_form_non_target_part_is_zero_when_the_student_equals_the_teacher(z, y):
    assert np.all(np.abs(np.asarray(_nontarget_kl(z, z, y))) < 1e-4)


def test_label_out_of_range_is_nan_inside_jit_and_an_error_eagerly():
    zs, zt = rand_logits(7, (3, 4)), rand_logits(8, (3, 4))
    values = jax.jit(lambda y: losses.nkd(zs, zt, y, reduction="none"))(jnp.array([0, 4, -1]))
    assert np.isfinite(values[0]) and np.all(np.isnan(values[1:]))
    with pytest.raises(ValueError, match="outside"):
        losses.nkd(zs, zt, np.array([-1, 0, 1]))


def test_bad_arguments_raise():
    z, y = np.zeros((2, 3), np.float32), np.array([0, 1])
    for bad, match in [
        (lambda: losses.nkd(z, z, y, gamma=-1.0), "gamma"),
        (lambda: losses.nkd(z, z, y, form="js"), "form"),
        (lambda: losses.nkd(z, z, y, temperature=1e-30), "temperature"),
        (lambda: losses.nkd(z, np.zeros((2, 4)), y), "number of classes"),
        (lambda: losses.nkd(z, z, np.array([0, 1, 2])), "labels must have shape"),
        (lambda: methods.nkd(form="x"), "form"),
        (lambda: methods.nkd(gamma=True), "gamma must be a number"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()


def test_method_matches_the_official_code_over_the_real_labeled_examples():
    zs, zt = rand_logits(18), rand_logits(19)
    y = np.array([0, -1, 2, 3, 4, 1], np.int32)
    mask, labeled = np.array([1, 1, 1, 1, 0, 1], bool), np.array([1, 0, 1, 1, 1, 1], bool)
    inputs = LossInputs.of(Outputs(jnp.asarray(zs), {}, {}), Outputs(jnp.asarray(zt), {}, {}),
                        {"label": y, "mask": mask, "labeled": labeled}, jnp.zeros((), jnp.int32))
    method = methods.nkd(temperature=3.0, gamma=3.5)
    value, aux = method.loss(method.init(jax.random.PRNGKey(0), inputs), inputs, jax.random.PRNGKey(1))
    keep = mask & labeled
    target, nontarget = np_nkd(zs[keep], zt[keep], y[keep], 3.0, 3.5)
    np.testing.assert_allclose([aux.metrics["target"], aux.metrics["nontarget"]], [target.mean(), nontarget.mean()],
                               rtol=1e-5)
    np.testing.assert_allclose(value, np.mean(target + nontarget), rtol=1e-5)
