"""The contract every feature, relational and ranking loss keeps (see tests/feature_contract.py)."""

from __future__ import annotations

import functools
import importlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.feature_contract import FeatureCase

CASES: list[FeatureCase] = []
for path in sorted(pathlib.Path(__file__).parent.glob("feature_cases_*.py")):
    CASES += importlib.import_module(f"tests.{path.stem}").CASES
IDS = [case.test_id for case in CASES]
assert len(set(IDS)) == len(IDS), "feature case ids must be unique"


def case_names() -> set[str]:
    return {case.name for case in CASES}


def inputs(case, seed=0):
    return tuple(np.asarray(x, np.float64) for x in case.make(np.random.default_rng(seed)))


def scalar(case, args, **kw):
    value = case.fn(*args, **kw)
    return value if case.relational else jnp.mean(value) if value.ndim else value


def central_differences(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    basis = (eps * np.eye(x.size)).reshape((x.size, *x.shape))

    @jax.jit
    def differences(x, basis):
        return (jax.vmap(lambda d: f(x + d))(basis) - jax.vmap(lambda d: f(x - d))(basis)) / (2 * eps)

    return np.asarray(differences(x, basis)).reshape(x.shape)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradient_matches_float64_finite_differences(case):
    args = inputs(case)
    with jax.enable_x64(True):
        for i in case.grad:
            def f(x, i=i):
                a = list(args)
                a[i] = x
                return scalar(case, a)

            # One compiled program for the value and the gradient, one for the differences (compiling is
            # what these small losses cost; op-by-op dispatch would compile every primitive).
            value, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(args[i]))
            assert value.dtype == jnp.float64, f"{case.test_id} computes in {value.dtype} on float64 inputs"
            fd = central_differences(f, args[i])
            np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7, err_msg=f"{case.test_id}: input {i}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bfloat16_inputs_compute_in_float32(case):
    args = inputs(case)
    bf16 = [jnp.asarray(a, jnp.bfloat16) if i in case.grad else jnp.asarray(a, jnp.float32) for i, a in enumerate(args)]
    rounded = [jnp.asarray(a, jnp.float32) for a in bf16]
    fn = jax.jit(case.fn)
    value = fn(*bf16)
    assert value.dtype == jnp.float32, f"{case.test_id}: bfloat16 inputs gave {value.dtype}"
    np.testing.assert_allclose(value, fn(*rounded), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jit_matches_eager(case):
    args = [jnp.asarray(a, jnp.float32) for a in inputs(case, seed=1)]
    np.testing.assert_allclose(jax.jit(case.fn)(*args), case.fn(*args), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nan_propagates(case):
    args = [np.asarray(a, np.float32) for a in inputs(case, seed=2)]
    i = case.grad[0]
    args[i] = args[i].copy()
    args[i].reshape(-1)[0] = np.nan
    assert bool(jnp.isnan(scalar(case, args))), f"{case.test_id}: a NaN input did not propagate"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_mask(case):
    args = [np.asarray(a, np.float32) for a in inputs(case, seed=3)]
    batch = args[case.batched[0]].shape[0]
    mask = np.ones(batch, bool)
    mask[::3] = False  # drop every third example
    assert mask.sum() >= case.min_examples
    masked = jax.jit(lambda *a, mask: case.fn(*a, mask=mask))
    if case.relational:
        subset = [a[mask] if i in case.batched else a for i, a in enumerate(args)]
        np.testing.assert_allclose(masked(*args, mask=mask), jax.jit(case.fn)(*subset), rtol=2e-5, atol=1e-6)
        # Whatever the masked examples hold, the value does not move.
        moved = [a.copy() for a in args]
        for i in case.batched:
            moved[i][~mask] = 7.0 * np.random.default_rng(9).normal(size=moved[i][~mask].shape)
        np.testing.assert_allclose(masked(*moved, mask=mask), masked(*args, mask=mask), rtol=2e-5, atol=1e-6)
    else:
        per_example = jax.jit(functools.partial(case.fn, reduction="none"))(*args)
        assert per_example.shape == (batch,)
        np.testing.assert_allclose(
            masked(*args, mask=mask), np.asarray(per_example)[mask].mean(), rtol=2e-5, atol=1e-6
        )
        grads = jax.jit(jax.grad(lambda x: masked(*[x if i == case.grad[0] else a for i, a in enumerate(args)], mask=mask)))(
            jnp.asarray(args[case.grad[0]])
        )
        if case.grad[0] in case.batched:
            assert not np.any(np.asarray(grads)[~mask]), f"{case.test_id}: masked examples get gradients"
