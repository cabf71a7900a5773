"""LSSKD and DisWOT: values against NumPy references, errors, the training-free ranking, and the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods, models
from tests.helpers import NUM_CLASSES, tiny_conv_models, tiny_image_batch


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_lsskd_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    z, a = rng.normal(size=(5, 4)), rng.normal(size=(5, 3, 4))
    y = np.array([0, 1, 3, 2, 1])
    T, al, be, ga = 3.0, 0.5, 1.5, 0.7
    ref = []
    for i in range(5):
        lp = _log_softmax(z[i] / T)
        ce = sum(-_log_softmax(a[i, l])[y[i]] for l in range(3))
        kd_aux = sum(np.sum(np.exp(lp) * (lp - _log_softmax(a[i, l] / T))) for l in range(3))
        q_bar = np.mean([np.exp(_log_softmax(a[i, l] / T)) for l in range(3)], axis=0)
        kd_final = np.sum(q_bar * (np.log(q_bar) - lp))
        ref.append(al * ce + be * T**2 * kd_aux + ga * T**2 * kd_final)
    got = losses.lsskd(z, a, z, a, y, temperature=T, aux_ce_weight=al, aux_kd_weight=be, final_kd_weight=ga,
                       reduction="none")
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_lsskd_errors():
    z, a, y = np.zeros((2, 3)), np.zeros((2, 2, 3)), np.array([0, 1])
    with pytest.raises(ValueError, match="aux_logits"):
        losses.lsskd(z, np.zeros((2, 3)), z, np.zeros((2, 3)), y)
    with pytest.raises(ValueError, match="targets"):
        losses.lsskd(z, a, z, np.zeros((2, 1, 3)), y)
    with pytest.raises(ValueError, match="temperature"):
        losses.lsskd(z, a, z, a, y, temperature=-1.0)
    with pytest.raises(ValueError, match="aux_kd_weight"):
        losses.lsskd(z, a, z, a, y, aux_kd_weight=-1.0)


def _gram_distance(fs, ft):  # the official batch_similarity (DisWOT index.md), NumPy
    def g(f):
        f = f.reshape(len(f), -1)
        m = f @ f.T
        return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)

    d = g(ft) - g(fs)
    return np.sum(d * d) / len(fs) ** 2


def test_diswot_relation_matches_the_official_formula():
    rng = np.random.default_rng(1)
    fs, ft = rng.normal(size=(6, 2, 2, 3)), rng.normal(size=(6, 7))
    np.testing.assert_allclose(losses.diswot_relation(fs, ft), _gram_distance(fs, ft), rtol=1e-5)
    # A property: invariant to scaling either network's features and to the batch order.
    perm = rng.permutation(6)
    np.testing.assert_allclose(losses.diswot_relation(3 * fs[perm], ft[perm]), _gram_distance(fs, ft), rtol=1e-5)


def test_fc_gradient_is_the_gradient_of_cross_entropy():
    rng = np.random.default_rng(2)
    e, W, b = rng.normal(size=(6, 3)), rng.normal(size=(3, 4)), rng.normal(size=4)
    y = np.array([0, 1, 2, 3, 0, 1])
    ce = lambda W: jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(e @ W + b), y[:, None], 1))
    np.testing.assert_allclose(losses.fc_gradient(e @ W + b, e, y), jax.grad(ce)(W).T, rtol=1e-5, atol=1e-7)


def test_diswot_semantic_matches_a_numpy_reference():
    rng = np.random.default_rng(3)
    zs, es, zt, et = rng.normal(size=(6, 4)), rng.normal(size=(6, 3)), rng.normal(size=(6, 4)), rng.normal(size=(6, 5))
    y = np.array([0, 1, 2, 3, 0, 1])

    def class_gram(z, e):
        p = np.exp(_log_softmax(z))
        a = (p - np.eye(4)[y]).T @ e  # [K, D]; the 1/B scale cancels in the normalization
        m = a @ a.T
        return m / np.linalg.norm(m, axis=1, keepdims=True)

    ref = np.sum((class_gram(zt, et) - class_gram(zs, es)) ** 2) / 16
    np.testing.assert_allclose(losses.diswot_semantic(zs, es, zt, et, y), ref, rtol=1e-5)
    np.testing.assert_allclose(losses.diswot_semantic(zs, es, zs, es, y), 0.0, atol=1e-7)


def test_diswot_errors():
    with pytest.raises(ValueError, match="batch"):
        losses.diswot_relation(np.zeros((3, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="classes"):
        losses.diswot_semantic(np.zeros((3, 4)), np.zeros((3, 2)), np.zeros((3, 5)), np.zeros((3, 2)), np.zeros(3, int))
    with pytest.raises(ValueError, match="label"):
        losses.fc_gradient(np.zeros((2, 3)), np.zeros((2, 2)), np.array([0, 3]))
    with pytest.raises(ValueError, match="together"):
        losses.diswot_score(np.zeros((3, 2)), np.zeros((3, 2)), student_logits=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="relation_weight"):
        methods.diswot(relation_weight=-1.0)


def test_diswot_rank_is_deterministic_and_puts_the_teacher_architecture_first():
    batch = tiny_image_batch(batch_size=6)
    teacher = models.get("resnet14", num_classes=NUM_CLASSES)
    candidates = {
        "resnet8": models.get("resnet8", num_classes=NUM_CLASSES),
        "resnet20": models.get("resnet20", num_classes=NUM_CLASSES),
        "resnet14": models.get("resnet14", num_classes=NUM_CLASSES),
    }
    first = methods.diswot_rank(teacher, candidates, batch, rng=jax.random.PRNGKey(0))
    again = methods.diswot_rank(teacher, candidates, batch, rng=jax.random.PRNGKey(0))
    assert first == again
    assert first[0][0] == "resnet14" and first[0][1] == pytest.approx(0.0, abs=1e-6)
    assert [n for n, _ in first[1:]] and all(score < 0 for _, score in first[1:])


def test_lsskd_and_diswot_in_the_train_step():
    teacher, student = tiny_conv_models()
    batch = tiny_image_batch()
    tvars = teacher.init(jax.random.PRNGKey(1), batch["image"])
    state = jaxkd.create(student=student, teacher=teacher, teacher_variables=tvars,
                         method=methods.parse("ce + lsskd + kd(temperature=4) + diswot"),
                         tx=optax.sgd(0.05, momentum=0.9), sample_batch=batch, rng=jax.random.PRNGKey(0))
    heads = [np.array(x) for x in jax.tree_util.tree_leaves(state.method.params["lsskd"])]  # the step donates
    new, metrics = jaxkd.make_train_step()(state, batch)
    for key in ("lsskd", "lsskd/ce_aux", "lsskd/kd_aux", "lsskd/kd_final", "diswot", "diswot/relation", "diswot/semantic"):
        assert np.isfinite(float(metrics[key])), key
    after = jax.tree_util.tree_leaves(new.method.params["lsskd"])
    assert any(not np.allclose(a, b) for a, b in zip(heads, after)), "the auxiliary classifiers did not train"
