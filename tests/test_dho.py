"""Dual-Head Optimization (jaxkd/losses/logit/dho.py, jaxkd/methods/logit/dho.py): the semi-supervised loss (CE over the
real labeled examples, KD over all real ones) and the inference mixture against NumPy; the method's
loss in a train step against NumPy, evaluation of the mixed heads, and one inference-changing method per
chain.

Gradients, bfloat16, jit == eager, classes excluded on both sides, NaN/+inf propagation, nonnegativity
and shift invariance are checked in tests/test_loss_contract.py.
"""

import jax
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods

from tests.helpers import teacher_variables, tiny_batch, tiny_models
from tests.numpy_reference import np_ce, np_kl_logits, np_log_softmax, rand_logits


def np_kd(zs, zt, T):
    """T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) per example, the logits divided by T in their own dtype."""
    return T**2 * np_kl_logits(np.asarray(zt) / T, np.asarray(zs) / T)


def test_dho_averages_ce_over_real_labeled_examples_and_kd_over_real_ones():
    zs, zk, zt = rand_logits(40), rand_logits(41), rand_logits(42)
    y = np.array([0, 1, 2, 0, 4, 1], np.int32)
    mask, labeled = np.array([1, 1, 1, 0, 1, 1], bool), np.array([1, 0, 1, 1, 0, 1], bool)
    ce = np_ce(zs, y)[mask & labeled].mean()
    kd = np_kd(zk, zt, 2.5)[mask].mean()
    np.testing.assert_allclose(losses.dho_terms(zs, zk, zt, y, temperature=2.5, mask=mask, labeled=labeled),
                               [ce, kd], rtol=1e-5)
    value = losses.dho(zs, zk, zt, y, temperature=2.5, ce_weight=0.3, kd_weight=0.7, mask=mask, labeled=labeled)
    np.testing.assert_allclose(value, 0.3 * ce + 0.7 * kd, rtol=1e-5)


def test_inference_mixes_the_two_heads_probabilities():
    zs, zk = rand_logits(43), rand_logits(44)
    p = 0.3 * np.exp(np_log_softmax(zs)) + 0.7 * np.exp(np_log_softmax(zk / 0.5))
    np.testing.assert_allclose(losses.dho_log_probs(zs, zk, mix=0.3, kd_head_temperature=0.5), np.log(p), rtol=1e-5)
    np.testing.assert_allclose(losses.dho_log_probs(zs, zk, mix=1.0), np_log_softmax(zs), rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise():
    z, y = np.zeros((2, 3), np.float32), np.array([0, 1])
    for bad, match in [
        (lambda: losses.dho_log_probs(z, z, mix=1.5), "mix"),
        (lambda: losses.dho_log_probs(z, z, kd_head_temperature=0.0), "kd_head_temperature"),
        (lambda: losses.dho(z, z, z, y, temperature=np.inf), "temperature"),
        (lambda: methods.dho(mix=-0.1), "mix"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()


def test_method_trains_its_head_and_evaluation_mixes_the_two_heads():
    teacher, student = tiny_models()
    batch = tiny_batch()
    t_vars = teacher_variables(teacher, batch)
    state = jaxkd.create(student=student, teacher=teacher, teacher_variables=t_vars,
                         method=methods.dho(temperature=2.0, mix=0.3, kd_head_temperature=0.5),
                         tx=optax.sgd(0.1), sample_batch=batch, rng=jax.random.PRNGKey(0))

    def heads(state, train):
        out = student.apply(state.student.variables(), batch["image"], train=train)
        head = jax.device_get(state.method_vars.params["dho"]["kd_head"]["out"])
        return np.asarray(out.logits), np.asarray(out.features["pooled"], np.float64) @ head["kernel"] + head["bias"]

    z_ce, z_kd = heads(state, train=True)
    z_t = np.asarray(teacher.apply(t_vars, batch["image"], train=False).logits)
    ce, kd = np_ce(z_ce, batch["label"]).mean(), np_kd(z_kd, z_t, 2.0).mean()
    state, metrics = jaxkd.make_train_step()(state, batch)  # metrics of the loss before the update
    np.testing.assert_allclose([metrics["dho/ce"], metrics["dho/kd"]], [ce, kd], rtol=1e-4)
    np.testing.assert_allclose(metrics["dho"], 0.5 * ce + 0.5 * kd, rtol=1e-4)

    z_ce, z_kd = heads(state, train=False)
    p = 0.3 * np.exp(np_log_softmax(z_ce)) + 0.7 * np.exp(np_log_softmax(z_kd / 0.5))
    result = jaxkd.evaluate(state, [dict(batch, mask=np.ones(16, bool))], jaxkd.make_eval_step())
    np.testing.assert_allclose(result["accuracy"], np.mean(p.argmax(-1) == batch["label"]))


def test_only_one_method_in_a_chain_may_change_inference():
    with pytest.raises(ValueError, match="change inference"):
        methods.dho() + methods.dho().named("dho2")
