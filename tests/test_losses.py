"""Cross-entropy, KL and Hinton KD against NumPy references written from the formulas."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.test_util import check_grads

from jaxkd import losses


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(p_logits, q_logits, T=1.0):
    lp, lq = np_log_softmax(np.asarray(p_logits) / T), np_log_softmax(np.asarray(q_logits) / T)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def rand_logits(seed, shape, scale=3.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


# ----- reference values -----

def test_cross_entropy_matches_numpy():
    z = rand_logits(0, (6, 5))
    y = np.array([0, 1, 4, 2, 3, 1])
    expected = -np_log_softmax(z)[np.arange(6), y].mean()
    np.testing.assert_allclose(losses.cross_entropy(z, y), expected, rtol=1e-6)


def test_cross_entropy_label_smoothing_matches_numpy():
    z = rand_logits(1, (4, 7))
    y = np.array([6, 0, 3, 3])
    eps = 0.1
    target = np.full((4, 7), eps / 7) + (1 - eps) * np.eye(7)[y]
    expected = -(target * np_log_softmax(z)).sum(-1).mean()
    np.testing.assert_allclose(losses.cross_entropy(z, y, label_smoothing=eps), expected, rtol=1e-6)


def test_kd_matches_numpy_with_t_squared():
    zs, zt = rand_logits(2, (8, 10)), rand_logits(3, (8, 10))
    T = 4.0
    expected = T**2 * np_kl(zt, zs, T).mean()
    np.testing.assert_allclose(losses.kd(zs, zt, temperature=T), expected, rtol=1e-5)


def test_kd_high_temperature_gradient_approaches_logit_matching():
    # Hinton et al. 2015, sec. 2.1: for T >> |z|, dL/dz_s -> (z_s - z_t) / C for zero-mean logits
    # (per example; batchmean divides by B).
    rng = np.random.default_rng(4)
    zs, zt = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    zs -= zs.mean(-1, keepdims=True)
    zt -= zt.mean(-1, keepdims=True)
    grad = jax.grad(lambda s: losses.kd(s, jnp.asarray(zt, jnp.float32), temperature=1e3))(jnp.asarray(zs, jnp.float32))
    np.testing.assert_allclose(grad, (zs - zt) / 6 / 3, atol=1e-4)


def test_mask_and_weights_reduce_as_documented():
    zs, zt = rand_logits(5, (5, 4)), rand_logits(6, (5, 4))
    per = np_kl(zt, zs)
    mask = np.array([1, 0, 1, 1, 0], bool)
    w = np.array([0.5, 3.0, 1.0, 2.0, 1.0])
    np.testing.assert_allclose(losses.kl_divergence(zt, zs, mask=mask), per[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(
        losses.kl_divergence(zt, zs, weights=w), (w * per).sum() / w.sum(), rtol=1e-5
    )
    np.testing.assert_allclose(losses.kl_divergence(zt, zs, reduction="sum"), per.sum(), rtol=1e-5)
    chex.assert_shape(losses.kl_divergence(zt, zs, reduction="none"), (5,))


def test_all_masked_batch_gives_zero_not_nan():
    zs, zt = rand_logits(7, (3, 4)), rand_logits(8, (3, 4))
    mask = np.zeros(3, bool)
    assert float(losses.kd(zs, zt, mask=mask)) == 0.0
    g = jax.grad(lambda s: losses.kd(s, zt, mask=mask))(zs)
    assert np.all(np.isfinite(g)) and np.all(g == 0)


def test_sequence_shaped_logits_and_token_mask():
    zs, zt = rand_logits(9, (2, 3, 5)), rand_logits(10, (2, 3, 5))
    mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
    expected = (4.0 * np_kl(zt, zs, 2.0))[mask].mean()
    np.testing.assert_allclose(losses.kd(zs, zt, temperature=2.0, mask=mask), expected, rtol=1e-5)


# ----- properties -----

logits_pairs = hnp.arrays(
    np.float32, (3, 6), elements=st.floats(-20, 20, width=32, allow_nan=False)
)


_kd_t2 = jax.jit(lambda s, t: losses.kd(s, t, temperature=2.0))
_kd_t3 = jax.jit(lambda s, t: losses.kd(s, t, temperature=3.0))


@settings(max_examples=40, deadline=None)
@given(zs=logits_pairs, zt=logits_pairs, shift=st.floats(-50, 50))
def test_kd_nonnegative_and_shift_invariant(zs, zt, shift):
    value = float(_kd_t2(zs, zt))
    assert value >= -1e-5
    shifted = float(_kd_t2(zs + np.float32(shift), zt - np.float32(shift)))
    np.testing.assert_allclose(shifted, value, atol=1e-3, rtol=1e-3)


@settings(max_examples=25, deadline=None)
@given(z=logits_pairs)
def test_kd_zero_on_equal_distributions(z):
    assert abs(float(_kd_t3(z, z + 3.0))) < 1e-4


# ----- gradients, jit, dtypes, masked vocabulary -----

def test_gradients_match_finite_differences():
    zs = jnp.asarray(rand_logits(11, (3, 5), 1.0))
    zt = jnp.asarray(rand_logits(12, (3, 5), 1.0))
    y = jnp.array([0, 4, 2])
    check_grads(lambda s: losses.kd(s, zt, temperature=2.0), (zs,), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)
    check_grads(lambda s: losses.cross_entropy(s, y, label_smoothing=0.1), (zs,), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


def test_jit_and_bfloat16_inputs_compute_in_float32():
    zs, zt = rand_logits(13, (4, 9)), rand_logits(14, (4, 9))
    f = jax.jit(lambda s, t: losses.kd(s, t, temperature=4.0))
    out = f(jnp.asarray(zs, jnp.bfloat16), jnp.asarray(zt, jnp.bfloat16))
    assert out.dtype == jnp.float32
    ref = 16 * np_kl(np.asarray(jnp.asarray(zt, jnp.bfloat16), np.float32), np.asarray(jnp.asarray(zs, jnp.bfloat16), np.float32), 4.0).mean()
    np.testing.assert_allclose(out, ref, rtol=1e-4)


def test_neg_inf_logits_give_finite_loss_and_grads():
    zs, zt = rand_logits(15, (3, 6)), rand_logits(16, (3, 6))
    zs[:, -2:] = -np.inf  # masked vocabulary on both sides
    zt[:, -2:] = -np.inf
    zt[0, 1] = -np.inf    # teacher alone excludes a class
    y = np.array([0, 2, 3])
    for fn in (lambda s: losses.kd(s, zt, temperature=2.0), lambda s: losses.cross_entropy(s, y)):
        value, grad = jax.value_and_grad(fn)(jnp.asarray(zs))
        assert np.isfinite(value) and np.all(np.isfinite(grad))
    # Equal to the KL over the classes the student keeps (p = 0 where the teacher alone masks a class).
    expected = []
    for i in range(3):
        keep = np.isfinite(zs[i])
        lq = np_log_softmax(zs[i][keep] / 2.0)
        p = np.exp(np_log_softmax(np.where(np.isfinite(zt[i]), zt[i], -1e30)[keep] / 2.0))
        expected.append(4 * np.sum(np.where(p > 0, p * (np.log(np.maximum(p, 1e-300)) - lq), 0.0)))
    np.testing.assert_allclose(losses.kd(zs, zt, temperature=2.0), np.mean(expected), rtol=1e-5)


def test_all_neg_inf_row_is_finite():
    zs = np.full((2, 4), -np.inf, np.float32)
    zs[1] = [0.0, 1.0, 2.0, 3.0]
    zt = zs.copy()
    value, grad = jax.value_and_grad(lambda s: losses.kd(s, zt))(jnp.asarray(zs))
    assert np.isfinite(value) and np.all(np.isfinite(grad))


# ----- bad input -----

@pytest.mark.parametrize("T", [0.0, -1.0])
def test_nonpositive_temperature_raises(T):
    with pytest.raises(ValueError, match="temperature"):
        losses.kd(np.zeros((2, 3)), np.zeros((2, 3)), temperature=T)


def test_vocabulary_mismatch_raises():
    with pytest.raises(ValueError, match="number of classes"):
        losses.kd(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="same shape"):
        losses.kd(np.zeros((2, 3)), np.zeros((3, 3)))


def test_label_out_of_range_raises():
    with pytest.raises(ValueError, match="outside"):
        losses.cross_entropy(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="outside"):
        losses.cross_entropy(np.zeros((2, 3)), np.array([-1, 0]))


def test_bad_label_smoothing_and_reduction_raise():
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.cross_entropy(np.zeros((2, 3)), np.array([0, 1]), label_smoothing=1.5)
    with pytest.raises(ValueError, match="reduction"):
        losses.kd(np.zeros((2, 3)), np.zeros((2, 3)), reduction="avg")
