"""Label cross-entropy and Hinton KD (jaxkd/losses/logit/classification.py) against NumPy references written
from the formulas; the shared reduction (mask, weights, sum, none) and its all-masked convention; the
label and non-finite conventions of the issue (a label on an excluded class, NaN and +inf logits, labels
out of range inside jit, temperatures out of range); the ``ce``/``kd`` methods and the train step's
detached teacher.

Gradients, bfloat16, jit == eager, a class excluded on both sides, NaN/+inf in one entry, nonnegativity
and shift invariance are checked for every loss in tests/test_loss_contract.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxkd
from jaxkd import losses, methods
from jaxkd.checks import TEMPERATURE_RANGE
from jaxkd.methods import LossInputs
from jaxkd.models import Outputs

from tests.helpers import teacher_variables, tiny_batch, tiny_models
from tests.numpy_reference import np_kl_logits, np_log_softmax, rand_logits


# ----- values against NumPy -----

def test_cross_entropy_matches_numpy():
    z = rand_logits(0, (6, 5))
    y = np.array([0, 1, 4, 2, 3, 1])
    np.testing.assert_allclose(losses.cross_entropy(z, y), -np_log_softmax(z)[np.arange(6), y].mean(), rtol=1e-6)


def test_cross_entropy_label_smoothing_matches_numpy():
    z = rand_logits(1, (4, 7))
    y = np.array([6, 0, 3, 3])
    eps = 0.1
    target = np.full((4, 7), eps / 7) + (1 - eps) * np.eye(7)[y]
    expected = -(target * np_log_softmax(z)).sum(-1).mean()
    np.testing.assert_allclose(losses.cross_entropy(z, y, label_smoothing=eps), expected, rtol=1e-6)


def test_kd_matches_numpy_with_t_squared():
    zs, zt = rand_logits(2, (8, 10)), rand_logits(3, (8, 10))
    np.testing.assert_allclose(losses.kd(zs, zt, temperature=4.0), 16 * np_kl_logits(zt, zs, 4.0).mean(), rtol=1e-5)


def test_kd_high_temperature_gradient_approaches_logit_matching():
    # Hinton et al. 2015, sec. 2.1: for zero-mean logits, ∂L/∂z_s → (z_s − z_t)/C as T → ∞, with an
    # O(1/T) error (per example; the mean over the batch divides by B).
    rng = np.random.default_rng(4)
    zs, zt = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    zs -= zs.mean(-1, keepdims=True)
    zt -= zt.mean(-1, keepdims=True)
    limit = (zs - zt) / 6 / 3
    with jax.enable_x64(True):
        errors = [np.abs(jax.grad(lambda s: losses.kd(s, zt, temperature=T))(zs) - limit).max() for T in (10.0, 100.0)]
    assert errors[1] < 2e-3 and errors[1] < errors[0] / 5


_kd_t3 = jax.jit(lambda s, t: losses.kd(s, t, temperature=3.0))


@settings(max_examples=25)
@given(z=hnp.arrays(np.float32, (3, 6), elements=st.floats(-20, 20, width=32)))
def test_kd_is_zero_on_equal_distributions(z):
    assert abs(float(_kd_t3(z, z + 3.0))) < 1e-4


# ----- the reduction every loss shares -----

def test_mask_weights_and_reductions_match_numpy():
    zs, zt = rand_logits(5, (5, 4)), rand_logits(6, (5, 4))
    per = 4.0 * np_kl_logits(zt, zs, 2.0)
    mask = np.array([1, 0, 1, 1, 0], bool)
    w = np.array([0.5, 3.0, 1.0, 2.0, 1.0])
    kd = lambda **kw: losses.kd(zs, zt, temperature=2.0, **kw)
    np.testing.assert_allclose(kd(mask=mask), per[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(kd(weights=w), (w * per).sum() / w.sum(), rtol=1e-5)
    np.testing.assert_allclose(kd(reduction="sum"), per.sum(), rtol=1e-5)
    np.testing.assert_allclose(kd(reduction="none"), per, rtol=1e-5)
    np.testing.assert_allclose(kd(mask=mask, reduction="none"), np.where(mask, per, 0.0), rtol=1e-5)


def test_sequence_shaped_logits_with_a_token_mask():
    zs, zt = rand_logits(9, (2, 3, 5)), rand_logits(10, (2, 3, 5))
    mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
    chex.assert_shape(losses.kd(zs, zt, reduction="none"), (2, 3))
    expected = (4.0 * np_kl_logits(zt, zs, 2.0))[mask].mean()
    np.testing.assert_allclose(losses.kd(zs, zt, temperature=2.0, mask=mask), expected, rtol=1e-5)


def test_all_masked_batch_gives_zero_and_zero_gradient():
    zs, zt = rand_logits(7, (3, 4)), rand_logits(8, (3, 4))
    value, g = jax.jit(jax.value_and_grad(lambda s: losses.kd(s, zt, mask=np.zeros(3, bool))))(zs)
    assert float(value) == 0.0 and np.all(np.asarray(g) == 0)


def test_masked_examples_do_not_change_the_value_even_when_nan():
    zs, zt = rand_logits(11, (3, 4)), rand_logits(12, (3, 4))
    zs[1] = np.nan  # padding may hold anything
    mask = np.array([1, 0, 1], bool)
    np.testing.assert_allclose(losses.kd(zs, zt, mask=mask), 16 * np_kl_logits(zt, zs, 4.0)[mask].mean(), rtol=1e-5)


# ----- excluded (-inf) classes: the conventions the contract does not cover -----

def test_kd_where_only_the_teacher_excludes_a_class_matches_numpy():
    # p_t = 0 there: the term is 0·log(0/q) = 0 exactly, the student keeps its mass on that class.
    zs, zt = rand_logits(15, (3, 6)), rand_logits(16, (3, 6))
    zt[0, 1] = zt[2, 4] = -np.inf
    np.testing.assert_allclose(losses.kd(zs, zt, temperature=2.0, reduction="none"), 4 * np_kl_logits(zt, zs, 2.0),
                               rtol=1e-5)


def test_a_row_excluded_on_both_sides_gives_zero_and_zero_gradient():
    zs = rand_logits(17, (2, 4))
    zs[0] = -np.inf
    value, g = jax.value_and_grad(lambda s: losses.kd(s, zs.copy(), reduction="sum"))(zs)
    per = losses.kd(zs, zs.copy(), reduction="none")
    assert float(per[0]) == 0.0 and float(value) == pytest.approx(float(per[1]), abs=1e-6)
    assert np.all(np.asarray(g)[0] == 0) and np.all(np.isfinite(g))


# ----- the bugs -----

def test_label_on_an_excluded_class_is_inf_inside_jit_and_an_error_eagerly():
    # It used to give 0 with a zero gradient: a data bug that trained silently.
    z = np.array([[0.5, -np.inf, 1.0], [1.0, 2.0, 3.0]], np.float32)
    y = np.array([1, 2])
    values = jax.jit(lambda z, y: losses.cross_entropy(z, y, reduction="none"))(z, y)
    assert float(values[0]) == np.inf
    np.testing.assert_allclose(values[1], -np_log_softmax(z[1])[2], rtol=1e-6)
    with pytest.raises(ValueError, match=r"label 1 at index \(0,\) is a class whose logit is -inf"):
        losses.cross_entropy(z, y)


def test_a_row_of_nan_logits_gives_nan_ce_and_kd_not_zero():
    # NaN used to be treated like -inf, and an all-excluded row gives 0.
    zs, zt = rand_logits(20, (2, 4)), rand_logits(21, (2, 4))
    zs[0] = np.nan
    assert np.isnan(losses.cross_entropy(zs, np.array([0, 1]), reduction="none")[0])
    assert np.isnan(losses.kd(zs, zt, reduction="none")[0])
    assert np.isnan(losses.kd(zt, zs, reduction="none")[0])  # NaN teacher too


def test_plus_inf_in_one_student_column_gives_nan_kl_not_a_negative_one():
    zs, zt = np.array([[np.inf, 0.0, 0.0]], np.float32), np.array([[1.0, 2.0, 3.0]], np.float32)
    assert np.isnan(float(losses.forward_kl(zs, zt)))
    assert np.isnan(float(losses.kd(zs, zt)))


@pytest.mark.parametrize("labels", [[0, 3], [-1, 0]], ids=["C", "-1"])
def test_label_out_of_range_is_nan_inside_jit_and_an_error_eagerly(labels):
    z = rand_logits(22, (2, 3))
    bad = 0 if labels[0] == -1 else 1
    values = jax.jit(lambda z, y: losses.cross_entropy(z, y, reduction="none"))(z, jnp.asarray(labels))
    assert np.isnan(values[bad]) and np.isfinite(values[1 - bad])
    with pytest.raises(ValueError, match="outside"):
        losses.cross_entropy(z, np.array(labels))


# ----- bad arguments -----

@pytest.mark.parametrize("T", [0.0, -1.0, np.inf, np.nan, 1e30, 1e-30, 5e-3, 101.0, "4", True])
def test_temperature_outside_its_range_or_not_a_number_raises(T):
    with pytest.raises(ValueError, match="temperature"):
        losses.kd(np.zeros((2, 3)), np.zeros((2, 3)), temperature=T)


def test_temperature_range_ends_are_accepted():
    for T in TEMPERATURE_RANGE:
        assert np.isfinite(float(losses.kd(rand_logits(23, (2, 3)), rand_logits(24, (2, 3)), temperature=T)))


def test_vocabulary_and_shape_mismatch_raise():
    with pytest.raises(ValueError, match="number of classes"):
        losses.kd(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="same shape"):
        losses.kd(np.zeros((2, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="labels must have shape"):
        losses.cross_entropy(np.zeros((2, 3)), np.array([0, 1, 2]))


def test_bad_label_smoothing_mask_and_reduction_raise():
    z, y = np.zeros((2, 3)), np.array([0, 1])
    for bad in (1.5, -0.1, "0.1"):
        with pytest.raises(ValueError, match="label_smoothing"):
            losses.cross_entropy(z, y, label_smoothing=bad)
    with pytest.raises(ValueError, match="reduction"):
        losses.kd(z, z, reduction="avg")
    with pytest.raises(ValueError, match="mask must have the examples' shape"):
        losses.kd(z, z, mask=np.ones(3, bool))


# ----- methods and the train step -----

def test_ce_and_kd_methods_match_numpy_over_the_labeled_real_examples():
    zs, zt = rand_logits(25, (6, 5)), rand_logits(26, (6, 5))
    mask = np.array([1, 1, 0, 1, 1, 1], bool)
    labeled = np.array([1, 0, 1, 1, 1, 0], bool)
    y = np.array([0, -1, 2, 3, 4, -1], np.int32)  # unlabeled examples may carry any integer
    inputs = LossInputs.of(Outputs(jnp.asarray(zs), {}, {}), Outputs(jnp.asarray(zt), {}, {}),
                        {"label": y, "mask": mask, "labeled": labeled}, jnp.zeros((), jnp.int32))
    method = methods.ce(label_smoothing=0.2) + 0.5 * methods.kd(temperature=2.0)
    total, aux = method.loss(method.init(jax.random.PRNGKey(0), inputs), inputs, jax.random.PRNGKey(1))
    keep = mask & labeled
    target = 0.2 / 5 + 0.8 * np.eye(5)[np.where(keep, y, 0)]
    ce = -(target * np_log_softmax(zs)).sum(-1)[keep].mean()
    kd = 4 * np_kl_logits(zt, zs, 2.0)[mask].mean()
    np.testing.assert_allclose(aux.metrics["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(aux.metrics["kd"], kd, rtol=1e-5)
    np.testing.assert_allclose(total, ce + 0.5 * kd, rtol=1e-5)


def test_train_step_detaches_the_teacher():
    # Methods use the teacher's outputs as they are: the step runs the teacher once, in eval mode, under
    # stop_gradient. The student's gradient must be that of the loss with the teacher's logits as a
    # constant, and the teacher must not move.
    teacher, student = tiny_models()
    batch = tiny_batch()
    method = methods.ce() + methods.kd(temperature=2.0) + methods.dkd() + methods.dist()
    state = jaxkd.create(student=student, teacher=teacher, teacher_variables=teacher_variables(teacher, batch),
                         method=method, tx=optax.sgd(1.0), sample_batch=batch, rng=jax.random.PRNGKey(0))
    params = jax.device_get(state.student.params)
    teacher_before = jax.device_get(state.teacher.params)
    constant = np.asarray(teacher.apply(state.teacher.variables(), batch["image"], train=False).logits)

    def loss(p):
        out = student.apply({"params": p}, batch["image"], train=True)
        inputs = LossInputs.of(out, Outputs(constant, {}, {}), batch, jnp.zeros((), jnp.int32))
        return method.loss(state.method_vars, inputs, jax.random.PRNGKey(0))[0]

    expected = jax.jit(jax.grad(loss))(params)
    state, _ = jaxkd.make_train_step(donate=False)(state, batch)
    step = jax.tree.map(lambda a, b: a - b, params, jax.device_get(state.student.params))  # sgd(1.0): the gradient
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), step, expected)
    jax.tree.map(np.testing.assert_array_equal, teacher_before, jax.device_get(state.teacher.params))
