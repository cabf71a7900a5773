"""jaxkd.models.mixed_matmul: bfloat16 operands, float32 accumulation, forward and backward.

The reference is the formula computed in NumPy float64 with explicit bfloat16 rounding (ml_dtypes):
``y = round(x·w)``, ``dx = round(round(g)·wᵀ)``, ``dw = round(xᵀ·round(g))``. float32 accumulation differs
from float64 by far less than one bfloat16 step, so the results agree to one bfloat16 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxkd.models.mixed_matmul import einsum

BF16 = ml_dtypes.bfloat16
ONE_STEP = 2.0**-7  # bfloat16's relative rounding step (8-bit significand)


def bf16(x):
    return np.asarray(x, np.float64).astype(BF16).astype(np.float64)


@pytest.mark.parametrize("spec,shapes", [
    ("btd,df->btf", ((2, 3, 8), (8, 5))),
    ("btd,dhk->bthk", ((2, 3, 8), (8, 2, 4))),
    ("btkgh,bskh->bkgts", ((2, 3, 1, 2, 4), (2, 3, 1, 4))),
])
def test_bfloat16_forward_and_backward_against_the_rounded_formula(spec, shapes):
    rng = np.random.default_rng(0)
    x, w = (bf16(rng.normal(size=s)) for s in shapes)
    g = rng.normal(size=np.einsum(spec, x, w).shape)
    y, vjp = jax.vjp(lambda a, b: einsum(spec, a, b), jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16))
    dx, dw = vjp(jnp.asarray(g, jnp.bfloat16))
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    lhs, rhs, out = spec.replace("->", ",").split(",")
    g16 = bf16(g)
    expected = {"y": bf16(np.einsum(spec, x, w)), "dx": bf16(np.einsum(f"{out},{rhs}->{lhs}", g16, w)),
                "dw": bf16(np.einsum(f"{lhs},{out}->{rhs}", x, g16))}
    for name, got in {"y": y, "dx": dx, "dw": dw}.items():
        np.testing.assert_allclose(np.asarray(got, np.float64), expected[name], rtol=ONE_STEP, atol=1e-6, err_msg=name)


def test_float32_logits_from_bfloat16_operands_are_not_rounded():
    rng = np.random.default_rng(1)
    x, w = bf16(rng.normal(size=(2, 3, 16))), bf16(rng.normal(size=(16, 7)))
    y = einsum("btd,dv->btv", jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), out_dtype=jnp.float32)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float64), np.einsum("btd,dv->btv", x, w), rtol=1e-6, atol=1e-6)


def test_float32_operands_are_jnp_einsum_exactly():
    rng = np.random.default_rng(2)
    x, w = rng.normal(size=(2, 3, 8)).astype(np.float32), rng.normal(size=(8, 5)).astype(np.float32)
    f = lambda a, b: jnp.sum(jnp.sin(einsum("btd,df->btf", a, b)))
    ref = lambda a, b: jnp.sum(jnp.sin(jnp.einsum("btd,df->btf", a, b)))
    for got, want in zip(jax.grad(f, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w)):
        np.testing.assert_array_equal(got, want)


def test_an_index_in_one_term_only_is_refused():
    with pytest.raises(ValueError, match="index 'z' appears in one term only"):
        einsum("btdz,df->btf", jnp.ones((1, 2, 4, 3), jnp.bfloat16), jnp.ones((4, 5), jnp.bfloat16))


def test_inside_an_interception_the_product_is_jnp_einsum(monkeypatch):
    # qwix (LoRA, int8) replaces jax.numpy.einsum while an adapted model runs and must see every product
    # to adapt it and differentiate through it; an interceptor standing in for qwix's records the calls.
    calls = []
    original = jnp.einsum

    def interceptor(spec, *operands, **kwargs):
        calls.append((spec, kwargs.get("preferred_element_type")))
        return original(spec, *operands, **kwargs)

    monkeypatch.setattr(jnp, "einsum", interceptor)
    x, w = jnp.ones((2, 3, 4), jnp.bfloat16), jnp.ones((4, 5), jnp.bfloat16)
    dx, dw = jax.grad(lambda a, b: jnp.sum(einsum("btd,df->btf", a, b, out_dtype=jnp.float32)), (0, 1))(x, w)
    assert calls == [("btd,df->btf", jnp.float32)]
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.full((2, 3, 4), 5.0))
    np.testing.assert_array_equal(np.asarray(dw, np.float32), np.full((4, 5), 6.0))
