"""BD-KD (jaxkd/losses/logit/bdkd.py, jaxkd/methods/logit/bdkd.py): the entropy weights against NumPy entropies, each
weighted term and the loss against the NumPy form ``T²·[w_f·KL(p_t‖p_s) + w_r·KL(p_s‖p_t)]``, the
direction of the balance, argument checks and the method's metrics.

Gradients (with the detached weights), bfloat16, jit == eager, classes excluded on both sides, NaN/+inf
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

from tests.numpy_reference import np_entropy, np_kl, np_softmax, rand_logits


def np_bdkd_terms(zs, zt, T):
    """The two weighted terms T²·w_f·KL(p_t‖p_s) and T²·w_r·KL(p_s‖p_t), w = (H_t, H_s)/(H_s + H_t)."""
    ps, pt = np_softmax(zs, T), np_softmax(zt, T)
    hs, ht = np_entropy(ps), np_entropy(pt)
    return T**2 * ht / (hs + ht) * np_kl(pt, ps), T**2 * hs / (hs + ht) * np_kl(ps, pt)


def test_weights_are_the_relative_entropies():
    zs, zt = rand_logits(27), rand_logits(28)
    hs, ht = np_entropy(np_softmax(zs, 3.0)), np_entropy(np_softmax(zt, 3.0))
    w_f, w_r = losses.bdkd_weights(zs, zt, temperature=3.0)
    np.testing.assert_allclose(w_f, ht / (hs + ht), rtol=1e-5)
    np.testing.assert_allclose(w_r, hs / (hs + ht), rtol=1e-5)


def test_reverse_weight_of_a_near_one_hot_student_is_its_small_entropy_ratio_not_zero():
    # H_s ≈ 6e-12: 1 − w_f rounds to 0 in float32, H_s/(H_s + H_t) does not. (float32 cannot resolve
    # log p_max = −2e-13 here, a few per cent of H_s; the reference is float64.)
    zs, zt = np.array([[30.0, 0.0, 0.0]], np.float32), np.array([[1.0, 0.0, -1.0]], np.float32)
    hs, ht = np_entropy(np_softmax(zs)), np_entropy(np_softmax(zt))
    w_f, w_r = losses.bdkd_weights(zs, zt, temperature=1.0)
    np.testing.assert_allclose(w_r, hs / (hs + ht), rtol=0.1)
    assert float(w_f[0]) == 1.0


def test_weights_are_one_half_when_both_entropies_are_zero():
    zs = np.array([[0.0, -np.inf, -np.inf]], np.float32)
    w_f, w_r = losses.bdkd_weights(zs, zs[:, ::-1].copy())
    assert float(w_f[0]) == float(w_r[0]) == 0.5


def test_a_confident_student_gets_more_forward_mass_covering_kl():
    sharp, flat = np.array([[8.0, 0.0, 0.0]], np.float32), np.array([[0.5, 0.0, 0.0]], np.float32)
    assert float(losses.bdkd_weights(sharp, flat)[0][0]) > 0.5 > float(losses.bdkd_weights(flat, sharp)[0][0])


def test_terms_and_loss_match_numpy():
    zs, zt = rand_logits(29), rand_logits(30)
    forward_ref, reverse_ref = np_bdkd_terms(zs, zt, 3.0)
    forward, reverse = losses.bdkd_terms(zs, zt, temperature=3.0, reduction="none")
    np.testing.assert_allclose(forward, forward_ref, rtol=1e-5)
    np.testing.assert_allclose(reverse, reverse_ref, rtol=1e-5)
    np.testing.assert_allclose(losses.bdkd(zs, zt, temperature=3.0, reduction="none"), forward_ref + reverse_ref,
                               rtol=1e-5)


_bdkd = jax.jit(lambda s, t: losses.bdkd(s, t, temperature=2.0, reduction="none"))


@settings(max_examples=25)
@given(z=hnp.arrays(np.float32, (3, 6), elements=st.floats(-10, 10, width=32)))
def test_zero_when_the_student_equals_the_teacher(z):
    assert np.all(np.abs(np.asarray(_bdkd(z, z))) < 1e-4)


def test_bad_arguments_raise():
    z = np.zeros((2, 3), np.float32)
    for bad, match in [
        (lambda: losses.bdkd(z, z, temperature=0.0), "temperature"),
        (lambda: losses.bdkd_weights(z, z, temperature=1e-30), "temperature"),
        (lambda: losses.bdkd(z, np.zeros((2, 4))), "number of classes"),
        (lambda: methods.bdkd(temperature=-2.0), "temperature"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()


def test_method_matches_numpy_over_the_unmasked_examples():
    zs, zt = rand_logits(31), rand_logits(32)
    mask = np.array([1, 1, 0, 1, 1, 1], bool)
    inputs = LossInputs.of(Outputs(jnp.asarray(zs), {}, {}), Outputs(jnp.asarray(zt), {}, {}), {"mask": mask},
                        jnp.zeros((), jnp.int32))
    method = methods.bdkd(temperature=2.0)
    value, aux = method.loss(method.init(jax.random.PRNGKey(0), inputs), inputs, jax.random.PRNGKey(1))
    forward, reverse = (t[mask].mean() for t in np_bdkd_terms(zs, zt, 2.0))
    hs, ht = np_entropy(np_softmax(zs, 2.0)), np_entropy(np_softmax(zt, 2.0))
    np.testing.assert_allclose([aux.metrics["forward"], aux.metrics["reverse"]], [forward, reverse], rtol=1e-5)
    np.testing.assert_allclose(aux.metrics["w_forward"], (ht / (hs + ht))[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(value, forward + reverse, rtol=1e-5)


# ----- online BD-KD: the teacher is trained too -----

def test_online_bdkd_trains_both_from_their_own_terms():
    import optax

    import jaxkd
    from jaxkd import models
    from tests.helpers import NUM_CLASSES, tiny_batch
    from tests.numpy_reference import np_ce

    batch = tiny_batch()
    student = models.get("mlp", num_classes=NUM_CLASSES, hidden_sizes=(16,))
    teacher = models.get("mlp", num_classes=NUM_CLASSES, hidden_sizes=(32,))
    state = jaxkd.create(student=student, method=methods.parse("bdkd_online(temperature=2)"), tx=optax.sgd(0.1),
                         sample_batch=batch, rng=jax.random.PRNGKey(0),
                         participants={"teacher": jaxkd.Participant(teacher, trains=True)})
    zs = np.asarray(student.apply(state.student.variables(), batch["image"], train=True).logits)
    zt = np.asarray(teacher.apply(state.teacher.variables(), batch["image"], train=True).logits)
    y = batch["label"]
    expected = (np_ce(zs, y) + np_ce(zt, y) + sum(np_bdkd_terms(zs, zt, 2.0)) + sum(np_bdkd_terms(zt, zs, 2.0))).mean()
    teacher_before = jax.device_get(state.teacher.params)
    state, metrics = jaxkd.make_train_step()(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    assert not np.allclose(teacher_before["dense1"]["kernel"], jax.device_get(state.teacher.params)["dense1"]["kernel"])
    assert {"accuracy", "teacher/accuracy"} <= set(metrics)
    assert "teacher_accuracy" in jaxkd.evaluate(state, [batch], jaxkd.make_eval_step())


def test_online_bdkd_gradients_reach_each_network_only_through_its_own_side():
    # d/dz_t of the total = d/dz_t [CE(z_t) + BD(z_t ← z_s fixed)]: the student's term sends nothing back.
    zs, zt = rand_logits(40).astype(np.float64), rand_logits(41).astype(np.float64)
    y = jnp.asarray([0, 1, 2, 3, 4, 0])
    method = methods.bdkd_online(temperature=2.0)

    def total(zs, zt):
        inputs = LossInputs.of(Outputs(zs, {}, {}), Outputs(zt, {}, {}), {"label": y})
        return method.loss(methods.MethodVars(), inputs, jax.random.PRNGKey(0))[0]

    with jax.enable_x64(True):
        g_t = jax.grad(total, argnums=1)(jnp.asarray(zs), jnp.asarray(zt))
        own = jax.grad(lambda t: losses.cross_entropy(t, y) + losses.bdkd(t, jnp.asarray(zs), temperature=2.0))(
            jnp.asarray(zt))
    np.testing.assert_allclose(g_t, own, rtol=1e-9, atol=1e-12)
