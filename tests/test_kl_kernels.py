"""The hand-differentiated KL / generalized-JSD kernels (jaxkd/losses/logit/kl_kernels.py).

tests/test_loss_contract.py checks their gradients against float64 finite differences on finite logits
(the *plain* form). Here: the *exact* form a batch with ``-inf`` logits takes (one-sided and two-sided
exclusions, an all-excluded row) against finite differences too; both forms against the autodiff
formulas the losses fall back to with a traced temperature (a second implementation of the same
conventions); second-order gradients; and a batch mixing rows with and without exclusions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import losses
from tests.test_loss_contract import central_differences

NONE = {"reduction": "none"}
B, C = 5, 6

DIVERGENCES = {
    "forward_kl": lambda s, t, T: losses.forward_kl(s, t, temperature=T, **NONE),
    "reverse_kl": lambda s, t, T: losses.reverse_kl(s, t, temperature=T, **NONE),
    "js_divergence": lambda s, t, T: losses.js_divergence(s, t, temperature=T, **NONE),
    "generalized_jsd": lambda s, t, T: losses.generalized_jsd(s, t, temperature=T, beta=0.3, **NONE),
    "generalized_jsd_0": lambda s, t, T: losses.generalized_jsd(s, t, temperature=T, beta=0.0, **NONE),
    "generalized_jsd_1": lambda s, t, T: losses.generalized_jsd(s, t, temperature=T, beta=1.0, **NONE),
}


def logits_with_exclusions(seed: int, dtype=np.float64):
    """Student and teacher logits with every kind of exclusion: a class only the student excludes (row 0),
    only the teacher (row 1), both (row 2, class 3), each side a different class (row 3), none (row 4)."""
    rng = np.random.default_rng(seed)
    s, t = (1.3 * rng.normal(size=(B, C))).astype(dtype), (1.3 * rng.normal(size=(B, C))).astype(dtype)
    s[0, 1] = -np.inf
    t[1, 2] = -np.inf
    s[2, 3] = t[2, 3] = -np.inf
    s[3, 0] = -np.inf
    t[3, 5] = -np.inf
    return s, t


def traced_temperature(fn, T):
    """The autodiff formulas: a traced temperature makes the losses skip the kernels."""
    return lambda s, t: jax.jit(lambda s, t, T: fn(s, t, T))(s, t, jnp.asarray(T, jnp.result_type(s)))


@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_exact_form_gradients_match_float64_finite_differences(name, T):
    fn = DIVERGENCES[name]
    s, t = logits_with_exclusions(0)
    w = np.linspace(0.5, 1.5, B)  # every row's value seen, not only their sum
    with jax.enable_x64(True):
        loss = lambda s, t: jnp.sum(w * fn(s, t, T))
        gs, gt = jax.jit(jax.grad(loss, argnums=(0, 1)))(s, t)
        finite_s, finite_t = np.isfinite(s), np.isfinite(t)
        # Finite differences only where the logit is finite (a -inf entry stays -inf when perturbed).
        fd_s = central_differences(lambda x: loss(jnp.where(finite_s, x, -jnp.inf), t), np.where(finite_s, s, 0.0))
        fd_t = central_differences(lambda x: loss(s, jnp.where(finite_t, x, -jnp.inf)), np.where(finite_t, t, 0.0))
        np.testing.assert_allclose(np.where(finite_s, gs, 0.0), np.where(finite_s, fd_s, 0.0), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(np.where(finite_t, gt, 0.0), np.where(finite_t, fd_t, 0.0), rtol=1e-6, atol=1e-8)
        assert np.all(np.asarray(gs)[~finite_s] == 0.0) and np.all(np.asarray(gt)[~finite_t] == 0.0)


@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("excluded", [False, True], ids=["plain", "exact"])
def test_kernels_equal_the_autodiff_formulas(name, excluded):
    fn = DIVERGENCES[name]
    s, t = logits_with_exclusions(1, np.float32)
    if not excluded:
        s, t = np.where(np.isfinite(s), s, 0.5), np.where(np.isfinite(t), t, -0.5)
    T = 1.7
    kernel = jax.jit(jax.value_and_grad(lambda s, t: jnp.sum(fn(s, t, T)), argnums=(0, 1)))
    value, grads = kernel(s, t)
    reference = jax.value_and_grad(lambda s, t: jnp.sum(traced_temperature(fn, T)(s, t)), argnums=(0, 1))
    ref_value, ref_grads = reference(s, t)
    np.testing.assert_allclose(value, ref_value, rtol=2e-6, atol=1e-7)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=1e-7)


def test_a_row_with_exclusions_does_not_change_the_others():
    # One -inf anywhere switches the whole call to the exact form: the other rows' values and gradients
    # are those of the plain form.
    s, t = logits_with_exclusions(2, np.float32)
    plain_s, plain_t = s[4:], t[4:]  # row 4 has no exclusion
    for name, fn in DIVERGENCES.items():
        f = jax.jit(jax.value_and_grad(lambda s, t: jnp.sum(fn(s, t, 1.0)[-1]), argnums=(0, 1)))
        value, (gs, gt) = f(s, t)
        plain_value, (plain_gs, plain_gt) = f(plain_s, plain_t)
        np.testing.assert_allclose(value, plain_value, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(gs[-1], plain_gs[0], rtol=1e-5, atol=1e-8, err_msg=name)
        np.testing.assert_allclose(gt[-1], plain_gt[0], rtol=1e-5, atol=1e-8, err_msg=name)
        assert np.all(np.asarray(gs[:-1]) == 0) and np.all(np.asarray(gt[:-1]) == 0)


@pytest.mark.parametrize("name", ["forward_kl", "generalized_jsd"])
def test_second_order_gradients_match_the_autodiff_formulas(name):
    # Reverse over reverse (a meta-gradient through a distillation step): the kernels' backward pass is
    # differentiated by autodiff; it must agree with differentiating the formulas twice.
    fn = DIVERGENCES[name]
    rng = np.random.default_rng(3)
    s, t = rng.normal(size=(B, C)).astype(np.float32), rng.normal(size=(B, C)).astype(np.float32)
    v = rng.normal(size=(B, C)).astype(np.float32)

    def hvp(f):
        grad = jax.grad(lambda s: jnp.sum(f(s, t)))
        return jax.grad(lambda s: jnp.vdot(grad(s), v))(s)

    np.testing.assert_allclose(hvp(lambda s, t: fn(s, t, 2.0)),
                               hvp(traced_temperature(fn, 2.0)), rtol=1e-4, atol=1e-6)


def test_bfloat16_gradients_come_back_in_bfloat16():
    s = jnp.asarray(np.random.default_rng(4).normal(size=(B, C)), jnp.bfloat16)
    t = jnp.asarray(np.random.default_rng(5).normal(size=(B, C)), jnp.bfloat16)
    for name, fn in DIVERGENCES.items():
        gs, gt = jax.grad(lambda s, t: jnp.sum(fn(s, t, 1.0)), argnums=(0, 1))(s, t)
        assert gs.dtype == gt.dtype == jnp.bfloat16, name
        ref = jax.grad(lambda s: jnp.sum(fn(s, t.astype(jnp.float32), 1.0)))(s.astype(jnp.float32))
        np.testing.assert_allclose(np.asarray(gs, np.float32), ref, rtol=2e-2, atol=2e-3, err_msg=name)


def cross_entropy_numpy(x: np.ndarray, labels: np.ndarray, eps: float) -> np.ndarray:
    """``−Σ y log softmax(x)`` from the formula, with -inf classes out of the softmax and of ``u``."""
    kept = np.isfinite(x)
    shift = np.max(np.where(kept, x, -np.inf), axis=-1, keepdims=True)
    log_q = x - shift - np.log(np.sum(np.where(kept, np.exp(x - shift), 0.0), axis=-1, keepdims=True))
    y = (1 - eps) * (np.arange(x.shape[-1]) == labels[:, None]) + eps * kept / kept.sum(-1, keepdims=True)
    return -np.sum(np.where(y > 0, y * np.where(kept, log_q, 0.0), 0.0), axis=-1)


@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("excluded", [False, True], ids=["plain", "exact"])
def test_cross_entropy_kernel_values_and_gradients(eps, excluded):
    s, _ = logits_with_exclusions(6)
    if not excluded:
        s = np.where(np.isfinite(s), s, 0.25)
    labels = np.array([2, 0, 1, 4, 5], np.int32)  # never an excluded class
    w = np.linspace(0.5, 1.5, B)
    with jax.enable_x64(True):
        value = jax.jit(lambda x: losses.cross_entropy(x, labels, label_smoothing=eps, **NONE))(s)
        np.testing.assert_allclose(value, cross_entropy_numpy(s, labels, eps), rtol=1e-12)
        loss = lambda x: jnp.sum(w * losses.cross_entropy(x, labels, label_smoothing=eps, **NONE))
        grad = np.asarray(jax.jit(jax.grad(loss))(s))
        finite = np.isfinite(s)
        fd = central_differences(lambda x: loss(jnp.where(finite, x, -jnp.inf)), np.where(finite, s, 0.0))
        np.testing.assert_allclose(np.where(finite, grad, 0.0), np.where(finite, fd, 0.0), rtol=1e-6, atol=1e-8)
        assert np.all(grad[~finite] == 0.0)


def test_cross_entropy_kernel_bad_labels_inside_jit():
    # Inside jit the labels cannot be checked: an out-of-range label is NaN with no gradient into its row;
    # a label at a -inf class is +inf (ε < 1), also for a row with every class excluded.
    x = np.random.default_rng(7).normal(size=(3, 4)).astype(np.float32)
    x[1, 2] = -np.inf
    x[2] = -np.inf
    labels = np.array([9, 2, 0], np.int32)
    f = jax.jit(lambda x, y: losses.cross_entropy(x, y, label_smoothing=0.1, **NONE))
    value = np.asarray(f(x, labels))
    assert np.isnan(value[0]) and value[1] == np.inf and value[2] == np.inf
    ok = np.array([1, 0, 3], np.int32)
    grad = jax.jit(jax.grad(lambda x: losses.cross_entropy(x, jnp.asarray([9, 0, 3], jnp.int32), **NONE)[0]))(x)
    assert np.all(np.asarray(grad) == 0.0)
    assert np.all(np.isfinite(f(x[:2], ok[:2])))


def test_a_nan_row_next_to_a_row_with_exclusions():
    # NaN in one row hides the other rows' -inf from a min-reduction; the exact form must still be taken,
    # so that only the NaN row is NaN.
    s, t = logits_with_exclusions(8, np.float32)
    s[4, 2] = np.nan
    for name, fn in DIVERGENCES.items():
        value = np.asarray(jax.jit(lambda s, t: fn(s, t, 1.0))(s, t))
        assert np.isnan(value[4]) and np.all(np.isfinite(value[:4])), (name, value)
        np.testing.assert_allclose(value[:4], jax.jit(lambda s, t: fn(s, t, 1.0))(s[:4], t[:4]), rtol=1e-6,
                                   err_msg=name)
    labels = np.array([2, 0, 1, 4, 5], np.int32)
    ce = np.asarray(jax.jit(lambda x: losses.cross_entropy(x, labels, **NONE))(s))
    assert np.isnan(ce[4]) and np.all(np.isfinite(ce[:4]))
