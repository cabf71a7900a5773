"""KL+DP, data-partitioned KD from Fantastic Gains (jaxkd/losses/logit/kd_dp.py, jaxkd/methods/logit/kd_dp.py), against
the official selection rule and loss written in NumPy (supervised and ``most-conf_u``), labels out of
range inside jit, an excluded class no label uses, and the method's frozen initial student and
``teacher_fraction`` in train steps.

Gradients, bfloat16, jit == eager, classes excluded on both sides, NaN/+inf propagation, nonnegativity
and shift invariance are checked in tests/test_loss_contract.py.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods

from tests.helpers import teacher_variables, tiny_batch, tiny_models
from tests.numpy_reference import np_kl_logits, np_log_softmax, rand_logits


def np_teacher_wins(zt, z0, y=None):
    """main_distillation.py: the teacher is the target where it is strictly more confident (in the label)."""
    p_t, p_0 = np.exp(np_log_softmax(zt)), np.exp(np_log_softmax(z0))
    if y is None:
        return p_t.max(-1) > p_0.max(-1)
    return p_t[np.arange(len(y)), y] > p_0[np.arange(len(y)), y]


logits = partial(rand_logits, scale=2.0)


@pytest.mark.parametrize("supervised", [True, False])
def test_distils_from_the_more_confident_of_teacher_and_initial_student(supervised):
    zs, zt, z0 = logits(6), logits(7), logits(8)
    y = np.array([0, 1, 2, 3, 4, 0]) if supervised else None
    use_t = np_teacher_wins(zt, z0, y)
    assert 0 < use_t.sum() < 6  # both targets occur
    expected = 4.0 * np_kl_logits(np.where(use_t[:, None], zt, z0) / 2.0, zs / 2.0)
    np.testing.assert_allclose(losses.kd_dp(zs, zt, z0, y, temperature=2.0, reduction="none"), expected, rtol=1e-5)
    np.testing.assert_array_equal(losses.teacher_is_more_confident(zt, z0, y), use_t)


def test_label_out_of_range_is_nan_inside_jit_and_an_error_eagerly():
    zs, zt, z0 = logits(9, (3, 4)), logits(10, (3, 4)), logits(11, (3, 4))
    values = jax.jit(lambda y: losses.kd_dp(zs, zt, z0, y, reduction="none"))(jnp.array([0, 4, -1]))
    assert np.isfinite(values[0]) and np.all(np.isnan(values[1:]))
    with pytest.raises(ValueError, match="outside"):
        losses.kd_dp(zs, zt, z0, np.array([0, 4, 1]))


def test_a_class_excluded_everywhere_that_no_label_uses_gives_finite_values_and_gradients():
    zs, zt, z0 = logits(12), logits(13), logits(14)
    for z in (zs, zt, z0):
        z[:, -1] = -np.inf
    y = np.array([0, 1, 2, 3, 0, 1])  # class 4 is excluded and no label uses it
    value, grads = jax.value_and_grad(lambda *a: losses.kd_dp(*a, y, temperature=2.0), (0, 1, 2))(zs, zt, z0)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)


def test_bad_arguments_raise():
    z = np.zeros((2, 3), np.float32)
    for bad, match in [
        (lambda: losses.kd_dp(z, z, z, temperature=0.0), "temperature"),
        (lambda: losses.kd_dp(z, z, np.zeros((2, 4))), "number of classes"),
        (lambda: losses.kd_dp(z, z, z, np.array([0, 1, 2])), "labels must have shape"),
        (lambda: methods.kd_dp(temperature="1"), "temperature must be a number"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()


def test_method_keeps_a_frozen_copy_of_the_initial_student():
    teacher, student = tiny_models()
    batch = tiny_batch()
    t_vars = teacher_variables(teacher, batch)
    state = jaxkd.create(student=student, teacher=teacher, teacher_variables=t_vars,
                         method=methods.kd_dp(temperature=2.0), tx=optax.sgd(0.1), sample_batch=batch,
                         rng=jax.random.PRNGKey(0))
    initial = jax.device_get(state.student.params)
    frozen = lambda: jax.device_get(state.method_vars.state["kd_dp"]["initial_student"]["params"])
    jax.tree.map(np.testing.assert_array_equal, frozen(), initial)
    z0 = np.asarray(student.apply(state.student.variables(), batch["image"], train=False).logits)
    zt = np.asarray(teacher.apply(t_vars, batch["image"], train=False).logits)
    step = jaxkd.make_train_step()
    fractions = []
    for _ in range(3):
        state, metrics = step(state, batch)
        fractions.append(float(metrics["kd_dp/teacher_fraction"]))
    jax.tree.map(np.testing.assert_array_equal, frozen(), initial)
    assert not np.allclose(state.student.params["fc"]["kernel"], initial["fc"]["kernel"])
    # The frozen copy keeps the partition fixed: every step sees the initial student's confidences.
    np.testing.assert_allclose(fractions, np.mean(np_teacher_wins(zt, z0, batch["label"])), rtol=1e-6)
