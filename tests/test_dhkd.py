"""Dual-Head KD (jaxkd/losses/logit/dhkd.py, jaxkd/methods/logit/dhkd.py): BinaryKL-Norm against the official
``BinaryKLNorm`` written in NumPy (and past the point where its float32 clamp breaks), ``dhkd`` with its
semi-supervised averaging against NumPy, and the method: its auxiliary head's loss in a train step
against NumPy, and evaluation on the model's own head.

Gradients, bfloat16, jit == eager, classes excluded on both sides, NaN/+inf propagation, nonnegativity
and (joint) shift invariance are checked in tests/test_loss_contract.py.
"""

import jax
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxkd
from jaxkd import losses, methods

from tests.helpers import teacher_variables, tiny_batch, tiny_models
from tests.numpy_reference import np_ce, rand_logits


def np_binary_kl_norm(zs, zt, T, eps=1e-8):
    """The official BinaryKLNorm per example (float64: its clamp at 1 − 1e-8 works there)."""
    d = np.clip(1 / (1 + np.exp(-(np.asarray(zs, np.float64) - zt) / T)), eps, 1 - eps)
    return T**2 * np.sum(0.5 * np.log(0.5 / d) + 0.5 * np.log(0.5 / (1 - d)), -1)


def test_binary_kl_norm_matches_the_official_code():
    zs, zt = rand_logits(35), rand_logits(36)
    np.testing.assert_allclose(losses.binary_kl_norm(zs, zt, temperature=2.0, reduction="none"),
                               np_binary_kl_norm(zs, zt, 2.0), rtol=1e-5)


def test_binary_kl_norm_stays_finite_past_the_float32_clamp():
    # In float32 the official clamp lets log(1 − d) reach -inf once |z_s − z_t| > ~17·T; beyond the clamp
    # the value is the clamped one and the gradient is 0.
    far = np.array([[100.0, -100.0, 1.0]], np.float32)
    teacher = np.zeros((1, 3), np.float32)
    value, grad = jax.value_and_grad(lambda s: losses.binary_kl_norm(s, teacher))(far)
    np.testing.assert_allclose(value, np_binary_kl_norm(far, teacher, 2.0), rtol=1e-5)
    assert np.all(np.asarray(grad)[0, :2] == 0) and np.asarray(grad)[0, 2] > 0


_bkl = jax.jit(lambda s, t: losses.binary_kl_norm(s, t, reduction="none"))


@settings(max_examples=25)
@given(z=hnp.arrays(np.float32, (3, 6), elements=st.floats(-10, 10, width=32)))
def test_binary_kl_norm_is_zero_when_the_logits_agree(z):
    assert np.all(np.abs(np.asarray(_bkl(z, z))) < 1e-5)


def test_dhkd_averages_ce_over_real_labeled_examples_and_bkl_over_real_ones():
    zs, za, zt = rand_logits(37), rand_logits(38), rand_logits(39)
    y = np.array([0, 1, 2, 0, 4, 1], np.int32)
    mask, labeled = np.array([1, 1, 1, 0, 1, 1], bool), np.array([1, 0, 1, 1, 1, 1], bool)
    ce = np_ce(zs, y)[mask & labeled].mean()
    bkl = np_binary_kl_norm(za, zt, 1.5)[mask].mean()
    terms = losses.dhkd_terms(zs, za, zt, y, temperature=1.5, mask=mask, labeled=labeled)
    np.testing.assert_allclose(terms, [ce, bkl], rtol=1e-5)
    value = losses.dhkd(zs, za, zt, y, temperature=1.5, ce_weight=0.7, kd_weight=0.1, mask=mask, labeled=labeled)
    np.testing.assert_allclose(value, 0.7 * ce + 0.1 * bkl, rtol=1e-5)


def test_bad_arguments_raise():
    z, y = np.zeros((2, 3), np.float32), np.array([0, 1])
    for bad, match in [
        (lambda: losses.binary_kl_norm(z, z, eps=0.7), "eps"),
        (lambda: losses.binary_kl_norm(z, z, temperature=0.0), "temperature"),
        (lambda: losses.binary_kl_norm(z, np.zeros((2, 4))), "number of classes"),
        (lambda: losses.dhkd(z, z, z, y, temperature=1e3), "temperature"),
        (lambda: methods.dhkd(hidden=0), "hidden"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()


def test_method_trains_the_auxiliary_head_and_evaluates_the_model_head():
    teacher, student = tiny_models()
    batch = tiny_batch()
    t_vars = teacher_variables(teacher, batch)
    state = jaxkd.create(student=student, teacher=teacher, teacher_variables=t_vars,
                         method=methods.dhkd(temperature=2.0, hidden=8, kd_weight=0.5), tx=optax.sgd(0.1),
                         sample_batch=batch, rng=jax.random.PRNGKey(0))
    head = jax.device_get(state.method_vars.params["dhkd"]["aux_head"])
    assert set(head) == {"hidden", "out"} and head["hidden"]["kernel"].shape == (16, 8)
    out = student.apply(state.student.variables(), batch["image"], train=True)
    f = np.asarray(out.features["pooled"], np.float64)
    hidden = np.maximum(f @ head["hidden"]["kernel"] + head["hidden"]["bias"], 0)
    aux = hidden @ head["out"]["kernel"] + head["out"]["bias"]
    z_t = np.asarray(teacher.apply(t_vars, batch["image"], train=False).logits)
    ce, bkl = np_ce(out.logits, batch["label"]).mean(), np_binary_kl_norm(aux, z_t, 2.0).mean()

    state, metrics = jaxkd.make_train_step()(state, batch)  # metrics of the loss before the update
    np.testing.assert_allclose([metrics["dhkd/ce"], metrics["dhkd/bkl"]], [ce, bkl], rtol=1e-4)
    np.testing.assert_allclose(metrics["dhkd"], ce + 0.5 * bkl, rtol=1e-4)
    out = student.apply(state.student.variables(), batch["image"], train=False)
    expected = np.mean(np.argmax(out.logits, -1) == batch["label"])
    result = jaxkd.evaluate(state, [dict(batch, mask=np.ones(16, bool))], jaxkd.make_eval_step())
    np.testing.assert_allclose(result["accuracy"], expected)
