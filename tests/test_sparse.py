"""Top-k (sparse) teachers (jaxkd/losses/logit/sparse.py): ``topk_teacher`` and ``sparse_forward_kl`` with both
tail conventions against float64 NumPy references (DistillKit's renormalized and tail-bucket forms), the
full-vocabulary and lower-bound limits, tail handling with excluded (-inf) classes, argument checks, and
the ``sparse_forward_kl`` method online and offline.

Gradients, bfloat16, jit == eager, classes excluded on both sides, NaN/+inf propagation, nonnegativity
and shift invariance are checked in tests/test_loss_contract.py.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import losses as S
from jaxkd import methods
from jaxkd.methods import LossInputs
from jaxkd.models import Outputs

from tests.numpy_reference import np_kl_finite, np_masked_softmax, rand_logits

T = 1.7
SHAPE = (4, 7)
NONE = {"reduction": "none"}


def np_sparse(zs, idx, log_p, temperature, tail):
    q = np_masked_softmax(zs, temperature)
    qk = np.take_along_axis(q, idx, -1)
    pk = np.exp(np.asarray(log_p, np.float64))
    if tail == "drop":
        with np.errstate(invalid="ignore"):  # a row with no student mass on K: 0/0, dropped by np_kl_finite
            return np_kl_finite(pk / pk.sum(-1, keepdims=True), qk / qk.sum(-1, keepdims=True))
    outside = np.ones_like(q, bool)
    np.put_along_axis(outside, idx, False, -1)
    p_tail = np.maximum(1 - pk.sum(-1, keepdims=True), 0.0)
    q_tail = np.where(outside, q, 0.0).sum(-1, keepdims=True)
    return np_kl_finite(np.concatenate([pk, p_tail], -1), np.concatenate([qk, q_tail], -1))


logits = partial(rand_logits, shape=SHAPE, scale=2.5)


def test_topk_teacher_matches_numpy():
    zt = logits(7)
    idx, log_p = S.topk_teacher(zt, 3, temperature=T)
    assert idx.shape == log_p.shape == (4, 3) and log_p.dtype == jnp.float32
    np.testing.assert_array_equal(idx, np.argsort(-zt, -1)[:, :3])
    np.testing.assert_allclose(log_p, np.log(np.take_along_axis(np_masked_softmax(zt, T), np.asarray(idx), -1)),
                               rtol=1e-5)


@pytest.mark.parametrize("tail", ["drop", "bucket"])
def test_sparse_forward_kl_matches_numpy(tail):
    zs, zt = logits(6), logits(7)
    idx, log_p = S.topk_teacher(zt, 3, temperature=T)
    got = S.sparse_forward_kl(zs, idx, log_p, temperature=T, tail=tail, **NONE)
    np.testing.assert_allclose(got, np_sparse(zs, np.asarray(idx), log_p, T, tail), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("tail", ["drop", "bucket"])
def test_full_vocabulary_is_the_dense_forward_kl_and_equal_distributions_give_zero(tail):
    zs, zt = logits(8), logits(9)
    idx, log_p = S.topk_teacher(zt, SHAPE[-1], temperature=T)
    dense = np_kl_finite(np_masked_softmax(zt, T), np_masked_softmax(zs, T))
    np.testing.assert_allclose(S.sparse_forward_kl(zs, idx, log_p, temperature=T, tail=tail, **NONE), dense, rtol=1e-5)
    idx, log_p = S.topk_teacher(zt, 3, temperature=T)
    np.testing.assert_allclose(S.sparse_forward_kl(zt + 1.0, idx, log_p, temperature=T, tail=tail), 0.0, atol=1e-6)


def test_bucket_is_a_lower_bound_and_only_it_sees_the_tail_mass():
    zs, zt = logits(10), logits(11)
    idx, log_p = S.topk_teacher(zt, 3)
    kl = lambda s, tail: np.asarray(S.sparse_forward_kl(s, idx, log_p, tail=tail, **NONE))
    dense = np_kl_finite(np_masked_softmax(zt), np_masked_softmax(zs))
    assert np.all(kl(zs, "bucket") <= dense + 1e-6)  # data processing inequality
    # Moving student mass between non-top-k classes changes neither tail form.
    outside = np.ones(SHAPE, bool)
    np.put_along_axis(outside, np.asarray(idx), False, -1)
    zs2 = zs.copy()
    for i in range(SHAPE[0]):
        cols = np.where(outside[i])[0]
        zs2[i, cols] = np.log(np.exp(zs[i, cols]).sum()) - np.log(len(cols))  # same tail mass, spread evenly
    for tail in ("drop", "bucket"):
        np.testing.assert_allclose(kl(zs2, tail), kl(zs, tail), rtol=1e-5, atol=1e-7)
    # Changing the student's total tail mass moves "bucket" but not "drop" (renormalized over K).
    zs3 = np.where(outside, zs + 2.0, zs).astype(np.float32)
    np.testing.assert_allclose(kl(zs3, "drop"), kl(zs, "drop"), rtol=1e-5, atol=1e-7)
    assert np.all(kl(zs3, "bucket") > kl(zs, "bucket") + 0.01)


def test_excluded_classes_in_the_top_k_and_a_student_with_one_class():
    zs, zt = logits(30), logits(31)
    zt[0, 2:] = -np.inf  # the teacher has 2 finite classes: k = 3 picks a -inf one (zero mass)
    zs[1, :] = -np.inf   # the student has one class left
    zs[1, 0] = 1.0
    idx, log_p = S.topk_teacher(zt, 3)
    assert np.sum(np.isneginf(np.asarray(log_p))) == 1
    for tail in ("drop", "bucket"):
        value = S.sparse_forward_kl(zs, idx, log_p, tail=tail, **NONE)
        np.testing.assert_allclose(value, np_sparse(zs, np.asarray(idx), log_p, 1.0, tail), rtol=1e-5, atol=1e-7)
        g = jax.grad(lambda s: S.sparse_forward_kl(s, idx, log_p, tail=tail))(zs)
        assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[np.isneginf(zs)] == 0)


def test_bad_input_raises():
    zs = logits(38)
    idx, lp = S.topk_teacher(zs, 2)
    good = np.array([[0, 1], [1, 2], [3, 4], [5, 6]])
    cases = [
        (lambda: S.topk_teacher(zs, 8), r"k=8 is larger than the vocabulary \(7"),
        (lambda: S.topk_teacher(zs, 0), "k must be an integer >= 1"),
        (lambda: S.topk_teacher(zs, 2.0), "k must be an integer"),
        (lambda: S.topk_teacher(zs, 2, temperature=0.0), "temperature"),
        (lambda: S.sparse_forward_kl(zs, np.zeros((4, 8), np.int32), np.zeros((4, 8), np.float32)),
         "k=8 is larger than the vocabulary"),
        (lambda: S.sparse_forward_kl(zs, idx, lp[:, :1]), "same shape"),
        (lambda: S.sparse_forward_kl(np.zeros((3, 7), np.float32), idx, lp), "student_logits.shape"),
        (lambda: S.sparse_forward_kl(zs, np.asarray(idx, np.float32), lp), "integers"),
        (lambda: S.sparse_forward_kl(zs, idx, lp, tail="uniform"), "tail must be one of"),
        (lambda: S.sparse_forward_kl(zs, idx, lp, temperature=1e3), "temperature"),
    ]
    for bad, match in [((0, 7), "top-k index 7 is outside the vocabulary"), ((0, -1), "top-k index -1 is outside"),
                       ((2, 2), "repeated index")]:
        idx_bad = good.copy()
        idx_bad[1] = bad
        cases.append((lambda idx_bad=idx_bad: S.sparse_forward_kl(zs, idx_bad, lp), match))
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()


# ----- the sparse_forward_kl method -----

def fake_inputs(batch, teacher=True):
    zs, zt = logits(0), logits(1)
    return LossInputs.of(student=Outputs(jnp.asarray(zs), {}, {}),
                      teacher=Outputs(jnp.asarray(zt), {}, {}) if teacher else None,
                      batch=batch, step=jnp.asarray(0, jnp.int32))


def run(method, inputs):
    return method.loss(method.init(jax.random.PRNGKey(0), inputs), inputs, jax.random.PRNGKey(1))


def test_sparse_kd_online_and_offline_match_numpy_over_the_unmasked_examples():
    mask = np.array([1, 1, 0, 1], bool)
    online = fake_inputs({"mask": mask})
    zs, zt = np.asarray(online.outputs["student"].logits), np.asarray(online.outputs["teacher"].logits)
    idx, lp = S.topk_teacher(zt, 4, temperature=2.0)  # the stored top-4; the method keeps the first 3
    expected = np_sparse(zs, np.asarray(idx)[:, :3], np.asarray(lp)[:, :3], 2.0, "bucket")[mask].mean()
    value, _ = run(methods.sparse_forward_kl(k=3, tail="bucket", temperature=2.0), online)
    np.testing.assert_allclose(value, expected, rtol=2e-5)
    offline = methods.sparse_forward_kl(k=3, tail="bucket", temperature=2.0, indices_key="i", log_probs_key="lp")
    assert not offline.needs.teacher and offline.needs.batch_keys == ("i", "lp")
    value, _ = run(offline, fake_inputs({"mask": mask, "i": idx, "lp": lp}, teacher=False))
    np.testing.assert_allclose(value, expected, rtol=2e-5)
    with pytest.raises(ValueError, match="k=5 is larger than the 4 stored"):
        run(methods.sparse_forward_kl(k=5, indices_key="i", log_probs_key="lp"), fake_inputs({"i": idx, "lp": lp}))


def test_sparse_kd_validates_its_arguments():
    for bad, match in [
        (lambda: methods.sparse_forward_kl(k=3, tail="zero"), "tail"),
        (lambda: methods.sparse_forward_kl(), "needs k"),
        (lambda: methods.sparse_forward_kl(k=0), "k must be an integer >= 1"),
        (lambda: methods.sparse_forward_kl(k=3, indices_key="i"), "both indices_key and log_probs_key"),
        (lambda: methods.sparse_forward_kl(k=3, temperature="1"), "temperature must be a number"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()
