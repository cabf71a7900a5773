"""The CPU-friendly convolution gives lax's values and gradients exactly (up to float rounding)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxkd.models import conv as conv_module
from jaxkd.models.conv import conv_general_dilated

DN = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("kernel, stride, pad", [(3, 1, 1), (3, 2, 1), (1, 2, 0), (1, 1, 0), (3, 1, 0)])
def test_values_and_gradients_match_lax(kernel, stride, pad, monkeypatch):
    monkeypatch.setattr(conv_module, "_IM2COL_MIN_WORK", 0)  # take the im2col gradient at any size
    rng = np.random.default_rng(kernel * 10 + stride)
    x = jnp.asarray(rng.normal(size=(2, 7, 6, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 4)), jnp.float32)
    args = ((stride, stride), ((pad, pad), (pad, pad)))

    def ours(x, w):
        return conv_general_dilated(x, w, *args, dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape, DN))

    def reference(x, w):
        return lax.conv_general_dilated(x, w, *args, dimension_numbers=DN)

    y = reference(x, w)
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    np.testing.assert_allclose(ours(x, w), y, rtol=1e-5, atol=1e-5)
    got = jax.vjp(ours, x, w)[1](g)
    want = jax.vjp(reference, x, w)[1](g)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_unusual_convolutions_fall_back_to_lax():
    x = jnp.ones((1, 5, 5, 4))
    w = jnp.ones((3, 3, 2, 4))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, DN)
    grouped = conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2)
    np.testing.assert_allclose(grouped, lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2))
