"""TAID (jaxkd/losses/logit/taid.py, jaxkd/methods/logit/taid.py) against the official code's computation: the
cross-entropy form of the loss in NumPy, its gradient (the closed form and the KL form's), the adaptive
update of ``t`` against the official rule in plain Python, and ``t`` carried in the method state through
train steps.

Gradients (with the detached student in the target), bfloat16, jit == eager, classes excluded on both
sides, NaN/+inf propagation, nonnegativity and shift invariance are checked in
tests/test_loss_contract.py.
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
from tests.numpy_reference import np_log_softmax, rand_logits

logits = partial(rand_logits, scale=2.0)


def test_loss_is_the_official_cross_entropy_to_the_interpolated_target():
    zs, zt = logits(0), logits(1)
    for t in (0.3, 1.0):  # t = 1: the cross-entropy to the teacher
        target = np.exp(np_log_softmax((1 - t) * zs + t * zt))
        expected = -(target * np_log_softmax(zs)).sum(-1)
        np.testing.assert_allclose(losses.taid(zs, zt, t=t, reduction="none"), expected, rtol=1e-5)


def test_gradient_is_softmax_minus_the_detached_target():
    # d/dz_s of −Σ p_t log softmax(z_s), p_t held fixed: (softmax(z_s) − p_t) / B.
    zs, zt = logits(20), logits(21)
    target = np.exp(np_log_softmax(0.6 * zs + 0.4 * zt))
    np.testing.assert_allclose(jax.grad(lambda s: losses.taid(s, zt, t=0.4))(zs),
                               (np.exp(np_log_softmax(zs)) - target) / 6, rtol=1e-4, atol=1e-6)


def test_gradient_equals_the_kl_form_gradient():
    zs, zt, t = jnp.asarray(logits(2)), jnp.asarray(logits(3)), 0.6

    def kl_form(s):
        target = jax.lax.stop_gradient(jax.nn.log_softmax((1 - t) * s + t * zt))
        return jnp.mean(jnp.sum(jnp.exp(target) * (target - jax.nn.log_softmax(s)), -1))

    np.testing.assert_allclose(jax.grad(lambda s: losses.taid(s, zt, t=t))(zs), jax.grad(kl_form)(zs),
                               rtol=1e-5, atol=1e-7)


def test_bad_arguments_raise():
    z = np.zeros((2, 3), np.float32)
    for bad, match in [
        (lambda: losses.taid(z, z, t=1.5), "t must lie"),
        (lambda: losses.taid(z, z, t="0.5"), "t must be a number"),
        (lambda: losses.taid(z, np.zeros((2, 4)), t=0.5), "number of classes"),
        (lambda: methods.taid_update(methods.taid_init_state(0.4), 1.0, 0, total_steps=0), "total_steps"),
        (lambda: methods.taid(total_steps=10, t_start=0.8, t_end=0.5), "t_end"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()


def reference_taid_updates(losses_seen, steps, total, t0=0.4, t1=1.0, a=5e-4, b=0.99):
    """The official update of t (SakanaAI/TAID, src/distil_losses/taid.py), in plain Python."""
    t, prev, m, ts = t0, None, 0.0, []
    for j, step in zip(losses_seen, steps):
        if prev is not None:
            m = b * m + (1 - b) * (prev - j) / (prev + 1e-15)
            t = min(t1, max(t0 + (t1 - t0) * step / total, t + a * (1 / (1 + np.exp(-m))) * (1 - t)))
        prev = j
        ts.append(t)
    return ts


def test_update_rule_matches_the_official_one():
    rng = np.random.default_rng(0)
    js = list(np.cumprod(1 - 0.05 * rng.random(30)) * 3.0)  # a decreasing loss
    state = methods.taid_init_state(0.4)
    got = []
    for step, j in enumerate(js):
        state = methods.taid_update(state, j, step, total_steps=1000, alpha=0.05)
        got.append(float(state.t))
    np.testing.assert_allclose(got, reference_taid_updates(js, range(30), 1000, a=0.05), rtol=1e-5)
    assert got[0] == pytest.approx(0.4) and got[-1] > got[1]


def test_t_is_carried_in_the_method_state_and_never_below_the_linear_schedule():
    teacher, student = tiny_models()
    batch = tiny_batch()
    state = jaxkd.create(student=student, teacher=teacher, teacher_variables=teacher_variables(teacher, batch),
                         method=methods.taid(total_steps=20) + methods.ce(), tx=optax.sgd(0.1), sample_batch=batch,
                         rng=jax.random.PRNGKey(0))
    step = jaxkd.make_train_step()
    ts = []
    for _ in range(10):
        state, metrics = step(state, batch)
        ts.append(float(metrics["taid/t"]))
    assert isinstance(state.method_vars.state["taid"], methods.TAIDState)
    assert ts[0] == pytest.approx(0.4) and all(b >= a for a, b in zip(ts, ts[1:]))
    assert float(state.method_vars.state["taid"].t) >= 0.4 + 0.6 * 9 / 20 - 1e-6
