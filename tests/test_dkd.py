"""Decoupled KD (jaxkd/losses/logit/dkd.py, jaxkd/methods/logit/dkd.py) against the official code's computation
(mdistiller's ``dkd_loss``, written in NumPy), the paper's decomposition identity, the binary-task case
(mdistiller#60), DKD on standardized logits, labels out of range inside jit, the method's label masking
and its warm-up schedule.

Gradients, bfloat16, jit == eager, classes excluded on both sides, NaN/+inf propagation, nonnegativity
and shift invariance are checked in tests/test_loss_contract.py.
"""

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
from jaxkd.methods import LossInputs
from jaxkd.models import Outputs

from tests.helpers import teacher_variables, tiny_batch, tiny_models
from tests.numpy_reference import np_kl, np_log_softmax, np_softmax, np_standardize, rand_logits


def np_dkd_official(zs, zt, y, T):
    """mdistiller's dkd_loss per example: binary split from the full softmax, NCKD with the −1000 trick."""
    tckd, nckd = [], []
    for n in range(zs.shape[0]):
        g = np.eye(zs.shape[1])[y[n]]
        ps, pt = np_softmax(zs[n] / T), np_softmax(zt[n] / T)
        bs = np.array([(ps * g).sum(), (ps * (1 - g)).sum()])
        bt = np.array([(pt * g).sum(), (pt * (1 - g)).sum()])
        tckd.append(T**2 * np.sum(bt * (np.log(bt) - np.log(bs))))
        lps, lpt = np_log_softmax(zs[n] / T - 1000 * g), np_log_softmax(zt[n] / T - 1000 * g)
        nckd.append(T**2 * np.sum(np.exp(lpt) * (lpt - lps)))
    return np.array(tckd), np.array(nckd)


def test_dkd_matches_official_code_with_the_minus_1000_trick():
    zs, zt = rand_logits(0), rand_logits(1)
    y = np.random.default_rng(2).integers(0, 5, 6).astype(np.int32)
    tckd_ref, nckd_ref = np_dkd_official(zs, zt, y, 4.0)
    tckd, nckd = losses.dkd_terms(zs, zt, y, temperature=4.0, reduction="none")
    np.testing.assert_allclose(tckd, tckd_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(nckd, nckd_ref, rtol=1e-4, atol=1e-5)
    value = losses.dkd(zs, zt, y, alpha=0.5, beta=8.0, temperature=4.0)
    np.testing.assert_allclose(value, np.mean(0.5 * tckd_ref + 8 * nckd_ref), rtol=1e-4)
    # In NumPy too: the −1000 trick equals the softmax over the non-target classes with the target deleted.
    direct = [16 * np_kl(np_softmax(np.delete(zt[n], y[n]) / 4), np_softmax(np.delete(zs[n], y[n]) / 4))
              for n in range(6)]
    np.testing.assert_allclose(direct, nckd_ref, rtol=1e-10)


def test_decomposition_identity_kd_equals_tckd_plus_weighted_nckd():
    # DKD paper, Eq. 1 (with T² on every term): T²·KL(p^T‖p^S) = TCKD + (1 − p^T_y)·NCKD per example.
    zs, zt = rand_logits(3), rand_logits(4)
    y = np.array([0, 4, 3, 3, 1, 2], np.int32)
    T = 2.0
    tckd, nckd = losses.dkd_terms(zs, zt, y, temperature=T, reduction="none")
    kd = [T**2 * np_kl(np_softmax(zt[n] / T), np_softmax(zs[n] / T)) for n in range(6)]
    pt_y = np_softmax(zt / T)[np.arange(6), y]
    np.testing.assert_allclose(kd, np.asarray(tckd) + (1 - pt_y) * np.asarray(nckd), rtol=1e-4, atol=1e-6)


def test_binary_task_nckd_is_zero_not_inf():
    # mdistiller#60: with C = 2 the single non-target class makes NCKD 0 (the −1000 trick gave inf), and
    # TCKD alone is the whole KL.
    zs = np.array([[30.0, -30.0], [0.5, 0.2], [-4.0, 9.0]], np.float32)
    zt = np.array([[-25.0, 25.0], [0.1, 0.3], [8.0, -8.0]], np.float32)
    y = np.array([0, 1, 1])
    tckd, nckd = losses.dkd_terms(zs, zt, y, temperature=4.0, reduction="none")
    assert np.all(np.asarray(nckd) == 0.0)
    np.testing.assert_allclose(tckd, [16 * np_kl(np_softmax(zt[n] / 4), np_softmax(zs[n] / 4)) for n in range(3)],
                               rtol=1e-4)
    assert np.all(np.isfinite(jax.grad(lambda s: losses.dkd(s, zt, y, beta=8.0))(zs)))


def test_binary_split_in_log_space_survives_underflow():
    # Probabilities that underflow (official: log(0) = -inf -> inf) still give the finite TCKD
    # KL([e^-1000, 1] ‖ [1, e^-1000]) = 1000.
    tckd, nckd = losses.dkd_terms(np.array([[500.0, -500.0]]), np.array([[-500.0, 500.0]]), np.array([0]),
                                  temperature=1.0)
    np.testing.assert_allclose(tckd, 1000.0, rtol=1e-5)
    assert float(nckd) == 0.0


def test_standardize_is_the_official_dkd_on_standardized_logits():
    zs, zt = rand_logits(5), rand_logits(6)
    y = np.array([1, 2, 0, 4, 4, 3], np.int32)
    tckd_ref, nckd_ref = np_dkd_official(np_standardize(zs), np_standardize(zt), y, 2.0)
    value = losses.dkd(zs, zt, y, alpha=1.0, beta=2.0, temperature=2.0, standardize=True)
    np.testing.assert_allclose(value, np.mean(tckd_ref + 2 * nckd_ref), rtol=1e-4)


def test_sequence_shaped_logits_and_labels_with_a_token_mask():
    zs, zt = rand_logits(48, (2, 3, 5)), rand_logits(49, (2, 3, 5))
    y = np.array([[0, 1, 2], [3, 4, 0]])
    mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
    tckd, nckd = np_dkd_official(zs[mask], zt[mask], y[mask], 4.0)
    np.testing.assert_allclose(losses.dkd(zs, zt, y, mask=mask), np.mean(tckd + 8 * nckd), rtol=1e-4)


_dkd_terms = jax.jit(lambda s, t, y: jnp.stack(losses.dkd_terms(s, t, y, temperature=2.0, reduction="none")))


@settings(max_examples=25)
@given(z=hnp.arrays(np.float32, (3, 6), elements=st.floats(-10, 10, width=32)),
       y=hnp.arrays(np.int32, (3,), elements=st.integers(0, 5)))
def test_both_terms_are_zero_when_the_student_equals_the_teacher(z, y):
    assert np.all(np.abs(np.asarray(_dkd_terms(z, z + 1.0, y))) < 1e-4)


def test_label_out_of_range_is_nan_inside_jit_and_an_error_eagerly():
    zs, zt = rand_logits(7, (3, 4)), rand_logits(8, (3, 4))
    values = jax.jit(lambda y: losses.dkd(zs, zt, y, reduction="none"))(jnp.array([0, 4, -1]))
    assert np.isfinite(values[0]) and np.all(np.isnan(values[1:]))
    with pytest.raises(ValueError, match="outside"):
        losses.dkd(zs, zt, np.array([0, 4, 1]))


def test_bad_arguments_raise():
    z, y = np.zeros((2, 3), np.float32), np.array([0, 1])
    for bad, match in [
        (lambda: losses.dkd(z, z, y, alpha=-1.0), "alpha"),
        (lambda: losses.dkd(z, z, y, beta=-0.5), "beta"),
        (lambda: losses.dkd(z, z, y, beta="8"), "beta must be a number"),
        (lambda: losses.dkd(z, z, y, temperature=0.0), "temperature"),
        (lambda: losses.dkd(z, z, y, temperature=1e30), "temperature"),
        (lambda: losses.dkd(z, np.zeros((2, 4)), y), "number of classes"),
        (lambda: losses.dkd(z, z, np.array([0, 1, 2])), "labels must have shape"),
        (lambda: losses.dkd(z, z, np.array([0.0, 1.0])), "labels must be integers"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()


# ----- the method -----

def fake_inputs(step=0):
    zs, zt = rand_logits(10), rand_logits(11)
    batch = {"label": np.array([0, 1, -1, 3, 4, 0], np.int32),
             "mask": np.array([1, 1, 1, 0, 1, 1], bool),
             "labeled": np.array([1, 1, 0, 1, 1, 1], bool)}
    return LossInputs.of(Outputs(jnp.asarray(zs), {}, {}), Outputs(jnp.asarray(zt), {}, {}), batch,
                      jnp.asarray(step, jnp.int32))


def run(method, inputs):
    return method.loss(method.init(jax.random.PRNGKey(0), inputs), inputs, jax.random.PRNGKey(1))


def test_method_matches_the_official_code_over_the_real_labeled_examples():
    inputs = fake_inputs()
    keep = inputs.batch["mask"] & inputs.batch["labeled"]
    zs, zt = np.asarray(inputs.outputs["student"].logits), np.asarray(inputs.outputs["teacher"].logits)
    tckd, nckd = np_dkd_official(zs[keep], zt[keep], inputs.batch["label"][keep], 3.0)
    value, aux = run(methods.dkd(alpha=2.0, beta=6.0, temperature=3.0), inputs)
    np.testing.assert_allclose(aux.metrics["tckd"], tckd.mean(), rtol=1e-4)
    np.testing.assert_allclose(aux.metrics["nckd"], nckd.mean(), rtol=1e-4)
    np.testing.assert_allclose(value, np.mean(2 * tckd + 6 * nckd), rtol=1e-4)


def test_warmup_ramps_the_weight_from_one_over_w_to_one():
    # mdistiller's min(epoch / warmup, 1) with epochs counted from 1: step s gets min((s + 1) / W, 1).
    schedule = methods.warmup_schedule(20)
    for step, w in [(0, 1 / 20), (9, 10 / 20), (19, 1.0), (100, 1.0)]:
        np.testing.assert_allclose(schedule(step), w, rtol=1e-6)
    method = methods.chain(2.0 * methods.dkd(warmup_steps=20))
    for step, w in [(0, 2 / 20), (9, 2 * 10 / 20), (100, 2.0)]:
        np.testing.assert_allclose(run(method, fake_inputs(step))[1].metrics["dkd/weight"], w, rtol=1e-6)
    assert methods.dkd().weight == 1.0 and float(methods.warmup_schedule(0)(5)) == 1.0
    with pytest.raises(ValueError, match="warmup_steps"):
        methods.dkd(warmup_steps=-1)


def test_train_step_passes_its_step_count_to_the_warmup():
    teacher, student = tiny_models()
    batch = tiny_batch()
    state = jaxkd.create(student=student, teacher=teacher, teacher_variables=teacher_variables(teacher, batch),
                         method=methods.ce() + methods.dkd(warmup_steps=2), tx=optax.sgd(0.05), sample_batch=batch,
                         rng=jax.random.PRNGKey(0))
    step = jaxkd.make_train_step()
    weights = []
    for _ in range(3):
        state, metrics = step(state, batch)
        weights.append(float(metrics["dkd/weight"]))
    np.testing.assert_allclose(weights, [0.5, 1.0, 1.0], rtol=1e-6)


def test_method_checks_arguments_and_needs_labels():
    for bad in (lambda: methods.dkd(temperature=0.0), lambda: methods.dkd(beta=-1.0),
                lambda: methods.dkd(alpha="1"), lambda: methods.dkd(warmup_steps=2.5)):
        with pytest.raises(ValueError):
            bad()
    assert methods.dkd().needs.labels and methods.dkd().needs.teacher
    with pytest.raises(ValueError, match=r"needs batch\['label'\]"):
        run(methods.dkd(), fake_inputs().replace(batch={}))
