"""DIST (jaxkd/losses/logit/dist.py, jaxkd/methods/logit/dist.py) against the official ``DIST`` loss written in NumPy:
values, the inter/intra terms, its masking of padded examples (values, gradients, all -inf rows, an
all-masked batch), sequence-shaped inputs, its fixed points, argument checks and the method.

Gradients, bfloat16, jit == eager, classes excluded on both sides, NaN/+inf propagation, nonnegativity
and shift invariance are checked in tests/test_loss_contract.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxkd import losses, methods
from jaxkd.methods import LossInputs
from jaxkd.models import Outputs

from tests.numpy_reference import np_softmax, rand_logits


def np_pearson(a, b, eps=1e-8):
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + eps)


def np_dist_terms(zs, zt, tau):
    """The official DIST: Pearson on the probabilities, per example (inter) and per class (intra)."""
    ys, yt = np_softmax(zs / tau), np_softmax(zt / tau)
    inter = 1 - np.mean([np_pearson(ys[n], yt[n]) for n in range(ys.shape[0])])
    intra = 1 - np.mean([np_pearson(ys[:, c], yt[:, c]) for c in range(ys.shape[1])])
    return inter, intra


def np_dist(zs, zt, beta, gamma, tau):
    inter, intra = np_dist_terms(zs, zt, tau)
    return tau**2 * (beta * inter + gamma * intra)


def test_matches_the_official_formula():
    zs, zt = rand_logits(10), rand_logits(11)
    np.testing.assert_allclose(losses.dist(zs, zt, beta=2.0, gamma=3.0, temperature=4.0),
                               np_dist(zs, zt, 2.0, 3.0, 4.0), rtol=1e-5)
    np.testing.assert_allclose(losses.dist_terms(zs, zt, temperature=4.0), np_dist_terms(zs, zt, 4.0), rtol=1e-5)


def test_mask_drops_padded_rows_from_inter_and_intra_statistics():
    zs, zt = rand_logits(12), rand_logits(13)
    mask = np.array([1, 0, 1, 1, 0, 1], bool)
    expected = np_dist(zs[mask], zt[mask], 1.0, 1.5, 2.0)
    garbage = zs.copy()
    garbage[~mask] = 1e4  # padding: anything there must not matter
    np.testing.assert_allclose(losses.dist(garbage, zt, beta=1.0, gamma=1.5, temperature=2.0, mask=mask), expected,
                               rtol=1e-5)
    g = jax.jit(jax.grad(lambda s: losses.dist(s, zt, mask=mask)))(garbage)
    assert np.all(np.asarray(g)[~mask] == 0)
    # An all -inf (padding) example counts as masked.
    zs_pad, zt_pad = zs.copy(), zt.copy()
    zs_pad[~mask] = zt_pad[~mask] = -np.inf
    np.testing.assert_allclose(losses.dist(zs_pad, zt_pad, beta=1.0, gamma=1.5, temperature=2.0), expected, rtol=1e-5)


def test_all_masked_batch_gives_zero_and_zero_gradient():
    zs, zt = rand_logits(14), rand_logits(15)
    value, g = jax.jit(jax.value_and_grad(lambda s: losses.dist(s, zt, mask=np.zeros(6, bool))))(zs)
    assert float(value) == 0.0 and np.all(np.asarray(g) == 0)


def test_sequence_shaped_logits_are_flattened_examples():
    zs, zt = rand_logits(48, (2, 3, 5)), rand_logits(49, (2, 3, 5))
    mask = np.array([[1, 1, 0], [1, 0, 1]], bool)
    np.testing.assert_allclose(losses.dist(zs, zt, mask=mask), np_dist(zs[mask], zt[mask], 1.0, 1.0, 1.0), rtol=1e-5)


_dist = jax.jit(lambda s, t: losses.dist(s, t, temperature=2.0))


@settings(max_examples=25)
@given(z=hnp.arrays(np.float32, (3, 6), elements=st.floats(-10, 10, width=32)))
def test_near_zero_when_the_student_equals_the_teacher_and_every_row_and_column_varies(z):
    # ρ(u, u) = ‖ū‖²/(‖ū‖² + eps), so 1 − ρ is small only when every row and column of the probabilities
    # varies well above eps (a constant one has ρ = 0, as in the official code).
    p = np_softmax(z / 2.0)
    spread = min(((p - p.mean(1, keepdims=True)) ** 2).sum(1).min(), ((p - p.mean(0)) ** 2).sum(0).min())
    if spread > 1e-4:
        assert float(_dist(z, z)) < 1e-3


def test_bad_arguments_raise():
    z = np.zeros((2, 3), np.float32)
    for bad, match in [
        (lambda: losses.dist(z, z, beta=-1.0), "beta"),
        (lambda: losses.dist(z, z, gamma=-1.0), "gamma"),
        (lambda: losses.dist(z, z, eps=0.0), "eps"),
        (lambda: losses.dist(z, z, temperature=0.0), "temperature"),
        (lambda: losses.dist(z, z, reduction="none"), "reduction='mean'"),
        (lambda: losses.dist(z, np.zeros((2, 4))), "number of classes"),
        (lambda: losses.dist(z, z, mask=np.ones(3, bool)), "mask must have the examples' shape"),
        (lambda: methods.dist(gamma=-1.0), "gamma"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()


def test_method_matches_the_official_formula_over_the_unmasked_examples():
    zs, zt = rand_logits(16), rand_logits(17)
    mask = np.array([1, 1, 1, 0, 1, 1], bool)
    inputs = LossInputs.of(Outputs(jnp.asarray(zs), {}, {}), Outputs(jnp.asarray(zt), {}, {}), {"mask": mask},
                        jnp.zeros((), jnp.int32))
    method = methods.dist(beta=2.0, gamma=0.5, temperature=4.0)
    value, aux = method.loss(method.init(jax.random.PRNGKey(0), inputs), inputs, jax.random.PRNGKey(1))
    inter, intra = np_dist_terms(zs[mask], zt[mask], 4.0)
    np.testing.assert_allclose([aux.metrics["inter"], aux.metrics["intra"]], [inter, intra], rtol=1e-5)
    np.testing.assert_allclose(value, 16 * (2.0 * inter + 0.5 * intra), rtol=1e-5)
