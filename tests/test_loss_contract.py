"""The contract every public logit loss keeps, checked case by case (tests/loss_cases.py lists the cases):

* its full gradient with respect to every logit input equals central finite differences computed in
  float64, coordinate by coordinate (the losses compute in float64 when given float64);
* bfloat16 inputs give a float32 result equal to the float32 computation on the rounded inputs;
* a class that is ``-inf`` for student and teacher gives exactly the loss without that class;
* NaN and ``+inf`` logits propagate (the loss is NaN), they are never treated as excluded classes;
* properties (hypothesis, derandomized): finite and ``>= 0`` on finite logits, invariant to per-row shifts;
* jit gives the eager value.

Values against references computed another way (NumPy from the paper's formula, the official code's
computation, closed forms) are in each method's own test file. That every public loss is called by some
test is checked by tests/call_coverage.py at the end of the whole suite.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxkd import losses
from tests.loss_cases import CASES

B, C = 6, 5
IDS = [case.name for case in CASES]


def make_data(case, seed=0, num_classes=C):
    rng = np.random.default_rng(seed)
    labels = rng.integers(1, num_classes, size=B).astype(np.int32)  # class 0 is the one the -inf test drops
    logits = [(1.5 * rng.normal(size=(B, num_classes))).astype(np.float32) for _ in range(case.num_logits)]
    return labels, logits


@functools.cache
def jitted(case):
    """The case's loss compiled once, with the labels as an argument (traced: value checks are skipped)."""
    return jax.jit(lambda labels, *logits: case.make(labels)(*logits))


def test_every_logit_case_is_a_public_loss():
    # Which public losses the tests call at all is recorded, not declared: tests/call_coverage.py.
    assert set(IDS) <= set(losses.__all__), f"logit cases of no public loss: {sorted(set(IDS) - set(losses.__all__))}"


def central_differences(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """``(f(x + eps·e_i) − f(x − eps·e_i)) / 2eps`` for every coordinate ``i`` (vectorized over i)."""
    basis = (eps * np.eye(x.size)).reshape((x.size, *x.shape))

    @jax.jit  # one compiled program: compiling, not computing, is what these small checks cost
    def differences(x, basis):
        return (jax.vmap(lambda d: f(x + d))(basis) - jax.vmap(lambda d: f(x - d))(basis)) / (2 * eps)

    return np.asarray(differences(x, basis)).reshape(x.shape)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradient_matches_float64_finite_differences(case):
    labels, logits = make_data(case, seed=1)
    with jax.enable_x64(True):
        x = [a.astype(np.float64) for a in logits]
        # Per-example weights make the check see each example's value, not only their sum.
        w = 1.0 if case.batch_level else np.linspace(0.5, 1.5, B)
        loss = lambda *a: jnp.sum(w * case.make(labels)(*a))
        reference = loss if case.frozen is None else (lambda *a: jnp.sum(w * case.frozen(labels, *x)(*a)))
        for i in case.grad:
            grad = np.asarray(jax.jit(jax.grad(loss, argnums=i))(*x))
            assert grad.dtype == np.float64
            fd = central_differences(lambda xi: reference(*x[:i], xi, *x[i + 1:]), x[i])
            np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8, err_msg=f"d{case.name}/d(logits {i})")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bfloat16_inputs_compute_in_float32(case):
    labels, logits = make_data(case, seed=2)
    f = jax.jit(case.make(labels))
    out = f(*[jnp.asarray(a, jnp.bfloat16) for a in logits])
    assert out.dtype == jnp.float32
    rounded = [np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32)) for a in logits]
    np.testing.assert_allclose(out, f(*rounded), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_class_excluded_on_every_side_is_the_loss_without_it(case):
    labels, logits = make_data(case, seed=3)
    masked = [a.copy() for a in logits]
    for a in masked:
        a[:, 0] = -np.inf
    value = jitted(case)(labels, *masked)
    without = jitted(case)(labels - 1, *[a[:, 1:] for a in logits])
    np.testing.assert_allclose(value, without, rtol=2e-5, atol=1e-6)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(case.make(labels)(*a)), argnums=case.grad))(*masked)
    for g in grads:
        assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[:, 0] == 0.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "+inf"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nan_and_plus_inf_propagate(case, bad):
    labels, logits = make_data(case, seed=4)
    for i in range(case.num_logits):
        corrupted = [a.copy() for a in logits]
        corrupted[i][2, 1] = bad
        value = np.asarray(jitted(case)(labels, *corrupted))
        if case.batch_level:
            assert np.isnan(value), f"{case.name}: {bad} in logits {i} gave {value}"
        else:
            assert np.isnan(value[2]), f"{case.name}: {bad} in logits {i} gave {value[2]}"
            assert np.all(np.isfinite(np.delete(value, 2))), "other examples must stay finite"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jit_matches_eager(case):
    labels, logits = make_data(case, seed=5)
    np.testing.assert_allclose(jitted(case)(labels, *logits), case.make(labels)(*logits), rtol=1e-5, atol=1e-6)


# Logits on a grid of 1/8: rows are either exactly constant or vary by at least 1/8, and shifts by
# multiples of 1/8 are exact in float32 — the properties then hold without float noise at the edges.
grid_logits = hnp.arrays(np.float32, (B, C), elements=st.integers(-64, 64).map(lambda k: k / 8.0))
grid_shifts = hnp.arrays(np.float32, (B, 1), elements=st.integers(-48, 48).map(lambda k: k / 8.0))


@pytest.mark.parametrize("case", CASES, ids=IDS)
@settings(max_examples=15)
@given(data=st.data())
def test_finite_nonnegative_and_shift_invariant(case, data):
    arrays = [data.draw(grid_logits) for _ in range(case.num_logits)]
    labels = data.draw(hnp.arrays(np.int32, (B,), elements=st.integers(0, C - 1)))
    f = functools.partial(jitted(case), labels)
    value = np.asarray(f(*arrays))
    assert np.all(np.isfinite(value))
    if case.nonnegative:
        assert np.all(value >= -1e-5)
    if case.shift == "each":
        shifted = [a + data.draw(grid_shifts) for a in arrays]
    else:
        shift = data.draw(grid_shifts)
        shifted = [a + shift for a in arrays]
    np.testing.assert_allclose(f(*shifted), value, rtol=1e-4, atol=1e-4)
