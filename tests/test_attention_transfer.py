"""Attention transfer and neuron selectivity transfer (jaxkd/losses/{at,nst}.py, jaxkd/methods/{at,nst}.py):
values against NumPy references written from RepDistiller's formulas in its NCHW layout (adaptive pooling
included), properties, bad inputs, and both methods in the jitted train step.

Finite-difference gradients, bfloat16, jit == eager, masks: tests/test_feature_contract.py.
"""

import jax
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods

from tests.helpers import tiny_conv_models, tiny_image_batch


def nchw(x):
    return np.transpose(np.asarray(x, np.float64), (0, 3, 1, 2))


def np_adaptive_pool(x, out):
    """PyTorch's adaptive_avg_pool2d on NCHW: cell i spans floor(i·H/out) .. ceil((i+1)·H/out)."""
    b, c, h, w = x.shape
    y = np.zeros((b, c, out[0], out[1]))
    for i in range(out[0]):
        h0, h1 = int(np.floor(i * h / out[0])), int(np.ceil((i + 1) * h / out[0]))
        for j in range(out[1]):
            w0, w1 = int(np.floor(j * w / out[1])), int(np.ceil((j + 1) * w / out[1]))
            y[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return y


def np_match(s, t):
    """RepDistiller's rule: pool the larger (square) map to the smaller one's size."""
    if s.shape[2] > t.shape[2]:
        s = np_adaptive_pool(s, t.shape[2:])
    elif s.shape[2] < t.shape[2]:
        t = np_adaptive_pool(t, s.shape[2:])
    return s, t


def np_at(f_s, f_t, p=2):
    """RepDistiller Attention.at_loss per example: at(f) = normalize(f^p.mean(1).view(B, -1))."""
    s, t = np_match(nchw(f_s), nchw(f_t))

    def at(f):
        q = (f ** p).mean(1).reshape(f.shape[0], -1)
        return q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)

    return ((at(s) - at(t)) ** 2).mean(1)


def np_nst(f_s, f_t):
    """RepDistiller NSTLoss.nst_loss per example (full loss, poly kernel (a·b)^2)."""
    s, t = np_match(nchw(f_s), nchw(f_t))

    def norm(f):
        f = f.reshape(f.shape[0], f.shape[1], -1)
        return f / np.maximum(np.linalg.norm(f, axis=2, keepdims=True), 1e-12)

    s, t = norm(s), norm(t)
    out = np.zeros(s.shape[0])
    for b in range(s.shape[0]):
        def k(a, c):
            return np.mean([[np.dot(x, y) ** 2 for x in a] for y in c])
        out[b] = k(t[b], t[b]) + k(s[b], s[b]) - 2 * k(s[b], t[b])
    return out


RNG = np.random.default_rng(0)


@pytest.mark.parametrize("shape_s, shape_t", [((4, 4, 4, 3), (4, 4, 4, 5)), ((4, 8, 8, 3), (4, 4, 4, 6)),
                                              ((4, 3, 3, 2), (4, 5, 5, 2))])
def test_at_matches_repdistiller(shape_s, shape_t):
    s, t = RNG.normal(size=shape_s), RNG.normal(size=shape_t)
    np.testing.assert_allclose(losses.at(s, t, reduction="none"), np_at(s, t), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(losses.at(s, t), np_at(s, t).mean(), rtol=1e-5)
    np.testing.assert_allclose(losses.at(s, t, p=4.0, reduction="none"), np_at(s, t, p=4), rtol=1e-5, atol=1e-8)


def test_at_is_scale_invariant_and_zero_for_equal_attention():
    s, t = RNG.normal(size=(3, 4, 4, 3)), RNG.normal(size=(3, 4, 4, 8))
    np.testing.assert_allclose(losses.at(5.0 * s, 0.1 * t), losses.at(s, t), rtol=1e-5)
    # Permuting channels (or adding channels with the same statistics) leaves the attention map alone.
    assert float(losses.at(s, s[..., ::-1])) < 1e-12


@pytest.mark.parametrize("shape_s, shape_t", [((3, 3, 3, 4), (3, 3, 3, 6)), ((3, 4, 4, 2), (3, 2, 2, 5))])
def test_nst_matches_repdistiller(shape_s, shape_t):
    s, t = RNG.normal(size=shape_s), RNG.normal(size=shape_t)
    np.testing.assert_allclose(losses.nst(s, t, reduction="none"), np_nst(s, t), rtol=1e-5, atol=1e-8)


def test_nst_is_an_mmd():
    s, t = RNG.normal(size=(3, 3, 3, 4)), RNG.normal(size=(3, 3, 3, 6))
    assert np.all(np.asarray(losses.nst(s, t, reduction="none")) >= 0)
    # The same channels in another order (and rescaled) are the same distribution: MMD 0.
    np.testing.assert_allclose(losses.nst(s, 3.0 * s[..., ::-1], reduction="none"), 0.0, atol=1e-6)
    # Degree 1, c = 1: k(x, y) = x·y + 1, MMD² = ‖mean_i s_i − mean_j t_j‖².
    def mean_channel(f):
        f = nchw(f).reshape(f.shape[0], f.shape[-1], -1)
        return (f / np.linalg.norm(f, axis=2, keepdims=True)).mean(1)
    expected = ((mean_channel(s) - mean_channel(t)) ** 2).sum(1)
    np.testing.assert_allclose(losses.nst(s, t, degree=1, constant=1.0, reduction="none"), expected, rtol=1e-5)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="p must"):
        losses.at(np.ones((2, 2, 2, 1)), np.ones((2, 2, 2, 1)), p=0.0)
    with pytest.raises(ValueError, match=r"NHWC.*\(2, 4\)"):
        losses.at(np.ones((2, 4)), np.ones((2, 2, 2, 1)))
    with pytest.raises(ValueError, match="batch sizes"):
        losses.nst(np.ones((2, 2, 2, 1)), np.ones((3, 2, 2, 1)))
    with pytest.raises(ValueError, match="degree"):
        losses.nst(np.ones((2, 2, 2, 1)), np.ones((2, 2, 2, 1)), degree=0)
    with pytest.raises(ValueError, match="constant"):
        methods.nst(constant=-1.0)
    with pytest.raises(ValueError, match="feature"):
        methods.at(student_features=())


TEACHER, STUDENT = tiny_conv_models()
BATCH = tiny_image_batch()


def test_at_and_nst_run_in_the_jitted_train_step():
    # One state with both terms: one compilation. AT reads every stage (8x8, 4x4, 2x2); NST too.
    state = jaxkd.create(
        student=STUDENT, teacher=TEACHER, teacher_variables=TEACHER.init(jax.random.PRNGKey(1), BATCH["image"]),
        method=methods.parse("ce + 1000 * at + 50 * nst"), tx=optax.sgd(0.05, momentum=0.9), sample_batch=BATCH,
        rng=jax.random.PRNGKey(0),
    )
    state, metrics = jaxkd.make_train_step()(state, BATCH)
    for name in ("at", "nst"):
        assert np.isfinite(float(metrics[name])) and float(metrics[name]) > 0
        parts = [float(metrics[f"{name}/stage{i}"]) for i in (1, 2, 3)]
        np.testing.assert_allclose(sum(parts), float(metrics[name]), rtol=1e-5)
    assert np.isfinite(float(metrics["loss"]))
