"""SinKD (jaxkd/losses/logit/sinkd.py, jaxkd/methods/logit/sinkd.py) against the official plain Sinkhorn loop written in
NumPy (the official value is B times ours) and a float64 log-domain Sinkhorn for tiny ε; the plan's
marginals and masked examples, an all-masked batch, argument checks and the method.

Gradients, bfloat16, jit == eager, classes excluded on both sides, NaN/+inf propagation, nonnegativity
and shift invariance are checked in tests/test_loss_contract.py.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import losses, methods
from jaxkd.methods import LossInputs
from jaxkd.models import Outputs

from tests.numpy_reference import np_softmax, rand_logits


def np_cost(zs, zt, T):
    ps, pt = np_softmax(zs / T), np_softmax(zt / T)
    return np.abs(ps[:, None, :] - pt[None, :, :]).sum(-1)  # W_ij = ‖p_s,i − p_t,j‖₁


def np_sinkhorn_official(zs, zt, T, eps, iters):
    """The official loop: plain (non-log) Sinkhorn, rows then columns normalized to 1."""
    W = np_cost(zs, zt, T)
    P = np.exp(-W / eps)
    for _ in range(iters):
        P = P / P.sum(1, keepdims=True)
        P = P / P.sum(0, keepdims=True)
    return float((P * W).sum())


def np_sinkhorn_log(zs, zt, T, eps, iters):
    """Log-domain Sinkhorn in float64 with uniform 1/B marginals (an independent reference for small ε)."""
    W = np_cost(zs, zt, T)
    B = W.shape[0]
    lse = lambda x, axis: x.max(axis) + np.log(np.exp(x - x.max(axis, keepdims=True)).sum(axis))
    f, g, log_m = np.zeros(B), np.zeros(B), np.log(np.full(B, 1.0 / B))
    for _ in range(iters):
        f = log_m - lse(-W / eps + g[None, :], 1)
        g = log_m - lse(-W / eps + f[:, None], 0)
    return float((np.exp(-W / eps + f[:, None] + g[None, :]) * W).sum())


logits = partial(rand_logits, scale=2.0)


def test_matches_the_official_sinkhorn_times_the_batch_size():
    zs, zt = logits(21), logits(22)
    ours = losses.sinkd(zs, zt, temperature=2.0, epsilon=0.1, iterations=20)
    np.testing.assert_allclose(6 * float(ours), np_sinkhorn_official(zs, zt, 2.0, 0.1, 20), rtol=1e-4)


def test_plan_marginals_are_uniform_and_masked_examples_are_absent():
    zs, zt = logits(23), logits(24)
    plan, cost = losses.sinkhorn_plan(zs, zt, epsilon=0.5, iterations=200)
    np.testing.assert_allclose(cost, np_cost(zs, zt, 2.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.sum(plan, 1), np.full(6, 1 / 6), atol=1e-5)
    np.testing.assert_allclose(np.sum(plan, 0), np.full(6, 1 / 6), atol=1e-5)
    mask = np.array([1, 1, 0, 1, 0, 1], bool)
    plan = np.asarray(losses.sinkhorn_plan(zs, zt, epsilon=0.5, iterations=200, mask=mask)[0])
    assert np.all(plan[~mask] == 0) and np.all(plan[:, ~mask] == 0)
    np.testing.assert_allclose(plan.sum(1)[mask], np.full(4, 1 / 4), atol=1e-5)
    np.testing.assert_allclose(plan.sum(0)[mask], np.full(4, 1 / 4), atol=1e-5)
    # The value is the Sinkhorn distance over the unmasked examples alone.
    expected = np_sinkhorn_official(zs[mask], zt[mask], 2.0, 0.1, 20) / 4
    np.testing.assert_allclose(losses.sinkd(zs, zt, mask=mask), expected, rtol=1e-4)


def test_log_domain_is_accurate_for_tiny_epsilon_where_the_plain_iteration_breaks_down():
    zs, zt = logits(25, scale=4.0), logits(26, scale=4.0)
    f = lambda s: losses.sinkd(s, zt, epsilon=1e-3, iterations=50)
    value, grad = jax.jit(jax.value_and_grad(f))(zs)
    np.testing.assert_allclose(value, np_sinkhorn_log(zs, zt, 2.0, 1e-3, 50), rtol=1e-3)
    assert np.all(np.isfinite(grad))
    # The plain float32 iteration: exp(−W/ε) underflows to 0 and rows normalize 0/0.
    with np.errstate(all="ignore"):
        K = np.exp(-np_cost(zs, zt, 2.0).astype(np.float32) / np.float32(1e-3))
        assert not np.all(np.isfinite(K / K.sum(1, keepdims=True)))


def test_all_masked_batch_gives_zero_and_zero_gradient():
    zs, zt = logits(27), logits(28)
    value, g = jax.jit(jax.value_and_grad(lambda s: losses.sinkd(s, zt, iterations=5, mask=np.zeros(6, bool))))(zs)
    assert float(value) == 0.0 and np.all(np.asarray(g) == 0)


def test_bad_arguments_raise():
    z = np.zeros((2, 3), np.float32)
    for bad, match in [
        (lambda: losses.sinkd(z, z, epsilon=0.0), "epsilon"),
        (lambda: losses.sinkd(z, z, iterations=0), "iterations"),
        (lambda: losses.sinkd(z, z, iterations=2.5), "iterations"),
        (lambda: losses.sinkd(z, z, temperature=np.inf), "temperature"),
        (lambda: losses.sinkd(z, z, reduction="sum"), "reduction='mean'"),
        (lambda: losses.sinkd(z, np.zeros((2, 4))), "number of classes"),
        (lambda: methods.sinkd(iterations=0), "iterations"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()


def test_method_matches_the_official_sinkhorn_over_the_unmasked_examples():
    zs, zt = logits(29), logits(30)
    mask = np.array([1, 1, 0, 1, 1, 1], bool)
    inputs = LossInputs.of(Outputs(jnp.asarray(zs), {}, {}), Outputs(jnp.asarray(zt), {}, {}), {"mask": mask},
                        jnp.zeros((), jnp.int32))
    method = methods.sinkd(temperature=1.5, epsilon=0.2, iterations=10)
    value, _ = method.loss(method.init(jax.random.PRNGKey(0), inputs), inputs, jax.random.PRNGKey(1))
    np.testing.assert_allclose(5 * float(value), np_sinkhorn_official(zs[mask], zt[mask], 1.5, 0.2, 10), rtol=1e-4)
