"""Plackett-Luce distillation (jaxkd/losses/logit/pld.py, jaxkd/methods/logit/pld.py) against the paper's Appendix C
code written as NumPy loops (teacher-optimal permutation, ties broken by class index), its optimum, labels
out of range inside jit, argument checks and the method's label masking.

Gradients, bfloat16, jit == eager, classes excluded on both sides, NaN/+inf propagation, nonnegativity
and shift invariance are checked in tests/test_loss_contract.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import losses, methods
from jaxkd.methods import LossInputs
from jaxkd.models import Outputs

from tests.numpy_reference import np_softmax, rand_logits


def np_pld_example(s, t, label, tau):
    """create_adjusted_ranking + plackett_luce_loss for one example; an excluded (-inf) student class has
    no term and no mass in the sums, an excluded teacher class has α = 0 and ranks last."""
    C = len(s)
    others = sorted((c for c in range(C) if c != label), key=lambda c: (-t[c], c))
    perm = [label] + others
    alpha = np_softmax(np.asarray(t, np.float64) / tau)
    total = 0.0
    for k in range(C):
        if np.isneginf(s[perm[k]]):
            continue
        rest = np.asarray([s[perm[l]] for l in range(k, C)], np.float64)
        total += alpha[perm[k]] * (np.log(np.sum(np.exp(rest))) - s[perm[k]])
    return total


def np_pld(zs, zt, y, tau):
    return np.array([np_pld_example(zs[n], zt[n], y[n], tau) for n in range(zs.shape[0])])


def test_matches_the_papers_code():
    zs, zt = rand_logits(18), rand_logits(19)
    zt[2, 4] = zt[2, 1]  # a tie, broken by class index
    y = np.array([0, 4, 2, 3, 3, 1], np.int32)
    for tau in (1.0, 4.0):
        np.testing.assert_allclose(losses.pld(zs, zt, y, teacher_temperature=tau, reduction="none"),
                                   np_pld(zs, zt, y, tau), rtol=1e-5)


def test_classes_excluded_on_one_side_follow_the_documented_convention():
    zs, zt = rand_logits(23), rand_logits(24)
    zt[0, 1] = zt[1, [2, 3]] = -np.inf  # only the teacher excludes: α = 0, ranked last
    zs[2, 4] = zs[3, 0] = -np.inf       # only the student excludes: dropped from every term
    y = np.array([0, 4, 2, 3, 3, 1], np.int32)
    np.testing.assert_allclose(losses.pld(zs, zt, y, teacher_temperature=2.0, reduction="none"),
                               np_pld(zs, zt, y, 2.0), rtol=1e-5)


def test_lowest_when_the_student_ranks_like_the_teacher_optimal_permutation():
    rng = np.random.default_rng(20)
    C = 6
    zt = rng.normal(size=(1, C)).astype(np.float32) * 2
    y = np.array([int(np.argmin(zt))])  # label differs from the teacher's top class
    perm = [y[0]] + sorted((c for c in range(C) if c != y[0]), key=lambda c: -zt[0, c])
    values = np.linspace(5.0, -5.0, C).astype(np.float32)
    aligned = np.zeros((1, C), np.float32)
    aligned[0, perm] = values
    best = float(losses.pld(aligned, zt, y))
    for _ in range(20):
        shuffled = np.zeros((1, C), np.float32)
        shuffled[0, perm] = rng.permutation(values)
        assert float(losses.pld(shuffled, zt, y)) >= best - 1e-6
    # Spreading the aligned logits drives the loss to 0 (every PL choice becomes certain).
    assert float(losses.pld(aligned * 20, zt, y)) < 1e-6 < best


def test_label_out_of_range_is_nan_inside_jit_and_an_error_eagerly():
    zs, zt = rand_logits(7, (3, 4)), rand_logits(8, (3, 4))
    values = jax.jit(lambda y: losses.pld(zs, zt, y, reduction="none"))(jnp.array([0, 4, -1]))
    assert np.isfinite(values[0]) and np.all(np.isnan(values[1:]))
    with pytest.raises(ValueError, match="outside"):
        losses.pld(zs, zt, np.array([0, 4, 1]))


def test_bad_arguments_raise():
    z, y = np.zeros((2, 3), np.float32), np.array([0, 1])
    for bad, match in [
        (lambda: losses.pld(z, z, y, teacher_temperature=0.0), "teacher_temperature"),
        (lambda: losses.pld(z, z, y, teacher_temperature=1e30), "teacher_temperature"),
        (lambda: losses.pld(z, np.zeros((2, 4)), y), "number of classes"),
        (lambda: losses.pld(z, z, np.array([0, 1, 2])), "labels must have shape"),
        (lambda: methods.pld(teacher_temperature=-1.0), "teacher_temperature"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()


def test_method_matches_the_papers_code_over_the_real_labeled_examples():
    zs, zt = rand_logits(21), rand_logits(22)
    y = np.array([0, -1, 2, 3, 4, 1], np.int32)
    mask, labeled = np.array([1, 1, 1, 0, 1, 1], bool), np.array([1, 0, 1, 1, 1, 1], bool)
    inputs = LossInputs.of(Outputs(jnp.asarray(zs), {}, {}), Outputs(jnp.asarray(zt), {}, {}),
                        {"label": y, "mask": mask, "labeled": labeled}, jnp.zeros((), jnp.int32))
    method = methods.pld(teacher_temperature=2.0)
    value, _ = method.loss(method.init(jax.random.PRNGKey(0), inputs), inputs, jax.random.PRNGKey(1))
    keep = mask & labeled
    np.testing.assert_allclose(value, np_pld(zs[keep], zt[keep], y[keep], 2.0).mean(), rtol=1e-5)
    with pytest.raises(ValueError, match=r"needs batch\['label'\]"):
        method.loss(None, inputs.replace(batch={}), jax.random.PRNGKey(1))
