"""KD³ and LELP: values against NumPy references written from the formulas, the LELP projection helper on
embeddings of known structure, the bad-input errors, and both methods in the jitted train step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods
from tests.helpers import NUM_CLASSES, teacher_variables, tiny_batch, tiny_models


def np_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ----- KD³ -----


def test_kd3_selection_matches_numpy():
    rng = np.random.default_rng(0)
    zs, zt = 2.0 * rng.normal(size=(12, 4)), 2.0 * rng.normal(size=(12, 4))
    combined = 0.3 * np_softmax(zt) + 0.7 * np_softmax(zs)
    expected = (combined.max(-1) >= 0.45).astype(np.float64)
    got = losses.kd3_selection(zs, zt, threshold=0.45, teacher_weight=0.3)
    np.testing.assert_array_equal(np.asarray(got), expected)
    assert 0 < expected.sum() < 12  # the threshold splits this batch
    # teacher_weight=1: the teacher's confidence alone; threshold 0 selects everything.
    np.testing.assert_array_equal(losses.kd3_selection(zs, zt, threshold=0.45, teacher_weight=1.0),
                                  (np_softmax(zt).max(-1) >= 0.45).astype(float))
    assert float(jnp.sum(losses.kd3_selection(zs, zt, threshold=0.0))) == 12
    # No gradient flows through the selection.
    assert not np.any(jax.grad(lambda z: jnp.sum(losses.kd3_selection(z, zt)))(jnp.asarray(zs)))


def test_kd3_terms_and_weighted_mean_match_numpy():
    rng = np.random.default_rng(1)
    zs, zt = 1.5 * rng.normal(size=(7, 5)), 1.5 * rng.normal(size=(7, 5))
    s, t = rng.normal(size=(7, 3)), rng.normal(size=(7, 3))
    T = 3.0
    pt, ps = np_softmax(zt / T), np_softmax(zs / T)
    kd = T**2 * np.sum(pt * (np.log(pt) - np.log(ps)), axis=-1)
    feat = np.mean((s - t) ** 2, axis=-1)
    got_kd, got_feat = losses.kd3_terms(zs, zt, s, t, temperature=T, reduction="none")
    np.testing.assert_allclose(got_kd, kd, rtol=1e-5)
    np.testing.assert_allclose(got_feat, feat, rtol=1e-5)
    w = np.array([1, 0, 1, 1, 0, 0, 1], np.float32)
    np.testing.assert_allclose(
        losses.kd3(zs, zt, s, t, temperature=T, feature_weight=0.5, weights=w),
        np.sum(w * (kd + 0.5 * feat)) / w.sum(), rtol=1e-5,
    )
    # Nothing selected: the loss is 0, not NaN.
    assert float(losses.kd3(zs, zt, s, t, weights=np.zeros(7, np.float32))) == 0.0


def test_kd3_classifier_alignment_matches_numpy_and_pulls_back_through_the_connector():
    rng = np.random.default_rng(2)
    ws, bs = rng.normal(size=(3, 4)), rng.normal(size=4)
    wt, bt = rng.normal(size=(5, 4)), rng.normal(size=4)
    a, c = rng.normal(size=(3, 5)), rng.normal(size=5)
    expected = np.mean((ws - a @ wt) ** 2) + np.mean((bs - (c @ wt + bt)) ** 2)
    np.testing.assert_allclose(losses.kd3_classifier_alignment(ws, bs, wt, bt, a, c), expected, rtol=1e-5)
    # Same widths, no connector.
    w2 = rng.normal(size=(5, 4))
    np.testing.assert_allclose(losses.kd3_classifier_alignment(w2, None, wt, bt),
                               np.mean((w2 - wt) ** 2) + np.mean(bt**2), rtol=1e-5)
    # At zero loss the student's classifier on f equals the teacher's classifier on the connected A f + a.
    f = rng.normal(size=(6, 3))
    ws0, bs0 = a @ wt, c @ wt + bt
    assert float(losses.kd3_classifier_alignment(ws0, bs0, wt, bt, a, c)) < 1e-10
    np.testing.assert_allclose(f @ ws0 + bs0, (f @ a + c) @ wt + bt, rtol=1e-6, atol=1e-10)
    # The teacher's parameters receive no gradient.
    g = jax.grad(lambda w: losses.kd3_classifier_alignment(ws, bs, w, bt, a, c))(jnp.asarray(wt))
    assert not np.any(g)


def test_kd3_bad_inputs():
    z = np.zeros((4, 3))
    f = np.zeros((4, 2))
    with pytest.raises(ValueError, match="threshold"):
        losses.kd3_selection(z, z, threshold=1.5)
    with pytest.raises(ValueError, match="teacher_weight"):
        losses.kd3_selection(z, z, teacher_weight=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        losses.kd3_terms(z, z, f, f, temperature=0.0)
    with pytest.raises(ValueError, match="feature_weight"):
        losses.kd3(z, z, f, f, feature_weight=-1.0)
    with pytest.raises(ValueError, match=r"\(4, 2\).*\(4, 5\)"):
        losses.kd3_terms(z, z, f, np.zeros((4, 5)))
    with pytest.raises(ValueError, match="number of classes"):
        losses.kd3_terms(z, np.zeros((4, 5)), f, f)
    with pytest.raises(ValueError, match="connector"):
        losses.kd3_classifier_alignment(np.zeros((2, 3)), None, np.zeros((5, 3)), None)
    with pytest.raises(ValueError, match="connector_kernel"):
        losses.kd3_classifier_alignment(np.zeros((2, 3)), None, np.zeros((5, 3)), None, np.zeros((5, 2)))
    with pytest.raises(ValueError, match="threshold"):
        methods.kd3(threshold=2.0)
    with pytest.raises(ValueError, match="classifier_weight"):
        methods.kd3(classifier_weight=-1.0)


# ----- LELP -----


def test_lelp_projections_recover_known_directions():
    rng = np.random.default_rng(3)
    d, n = 6, 400
    means = np.array([[5.0, 0, 0, 0, 0, 0], [0, 5.0, 0, 0, 0, 0]])
    # Class 0 varies most along axis 2 (std 3), then axis 3 (std 1.5); class 1 along axis 4 (std 2), then 5 (1).
    scales = np.array([[0.1, 0.1, 3.0, 1.5, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1, 2.0, 1.0]])
    labels = np.repeat([0, 1], n)
    emb = means[labels] + rng.normal(size=(2 * n, d)) * scales[labels]
    proj = losses.lelp_projections(emb, labels, num_classes=2, subclasses=2)
    assert proj.shape == (2, 2, d + 1) and proj.dtype == np.float64
    for c, axes in ((0, (2, 3)), (1, (4, 5))):
        for s, axis in enumerate(axes):
            direction = proj[c, s, :d] / np.linalg.norm(proj[c, s, :d])
            assert abs(direction[axis]) > 0.99 and direction[axis] > 0  # the sign convention: largest entry > 0
            u = emb[labels == c] @ proj[c, s, :d] + proj[c, s, d]
            np.testing.assert_allclose([u.mean(), u.std()], [0.0, 1.0], atol=1e-9)  # standardized coordinates
    # Removing the classifier's span: with axis 2 a classifier column, class 0's top direction is axis 3.
    kernel = np.zeros((d, 2))
    kernel[2, 0], kernel[0, 1] = 1.0, 1.0
    proj_null = losses.lelp_projections(emb, labels, num_classes=2, subclasses=1, classifier_kernel=kernel)
    top = proj_null[0, 0, :d] / np.linalg.norm(proj_null[0, 0, :d])
    assert abs(top[3]) > 0.99 and abs(top[2]) < 1e-9
    # A class without examples and directions without variance are all zeros (an equal split).
    proj3 = losses.lelp_projections(emb[:3].astype(np.float32), labels[:3], num_classes=2, subclasses=4)
    assert proj3.dtype == np.float32
    assert not np.any(proj3[1]) and not np.any(proj3[0, 2:]) and np.all(np.any(proj3[0, :2], axis=-1))


def _np_lelp_targets(zt, f, proj, T, tau):
    u = np.einsum("bd,ksd->bks", f, proj[..., :-1]) + proj[..., -1]
    return np_softmax(zt / T)[..., None] * np_softmax(u / tau, axis=-1)


def test_lelp_targets_and_loss_match_numpy():
    rng = np.random.default_rng(4)
    b, k, s, d = 5, 3, 4, 6
    zt, f = 2.0 * rng.normal(size=(b, k)), rng.normal(size=(b, d))
    proj = rng.normal(size=(k, s, d + 1))
    zs = rng.normal(size=(b, k * s))
    T, tau = 2.0, 0.7
    p = _np_lelp_targets(zt, f, proj, T, tau)
    got = np.exp(np.asarray(losses.lelp_targets(zt, f, proj, temperature=T, subclass_temperature=tau)))
    np.testing.assert_allclose(got, p, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.sum(-1), np_softmax(zt / T), rtol=1e-5)  # class marginals kept
    pf = p.reshape(b, k * s)
    q = np_softmax(zs / T)
    expected = T**2 * np.sum(pf * (np.log(pf) - np.log(q)), axis=-1)
    np.testing.assert_allclose(
        losses.lelp(zs, zt, f, proj, temperature=T, subclass_temperature=tau, reduction="none"), expected, rtol=1e-5
    )


def test_lelp_bad_inputs(tmp_path):
    zt, f, proj = np.zeros((4, 3)), np.zeros((4, 5)), np.zeros((3, 2, 6))
    with pytest.raises(ValueError, match=r"\[B, K·S\]"):
        losses.lelp(np.zeros((4, 5)), zt, f, proj)
    with pytest.raises(ValueError, match="projections must be"):
        losses.lelp_targets(zt, f, np.zeros((3, 2, 5)))
    with pytest.raises(ValueError, match="subclass_temperature"):
        losses.lelp_targets(zt, f, proj, subclass_temperature=-1.0)
    with pytest.raises(ValueError, match="subclasses"):
        losses.lelp_projections(f, np.zeros(4, int), num_classes=3, subclasses=9)
    with pytest.raises(ValueError, match="labels must lie"):
        losses.lelp_projections(f, np.array([0, 1, 2, 3]), num_classes=3)
    with pytest.raises(ValueError, match="classifier_kernel"):
        losses.lelp_projections(f, np.zeros(4, int), num_classes=3, classifier_kernel=np.zeros((4, 3)))
    with pytest.raises(ValueError, match="projections must be a finite"):
        methods.lelp(projections=np.zeros((3, 6)))
    with pytest.raises(ValueError, match="temperature"):
        methods.lelp(projections=proj, temperature=0.0)


# ----- the methods in the jitted train step (MLPs: pooled widths 32 and 16) -----


def _train(method, batch, steps=2):
    teacher, student = tiny_models()
    tvars = teacher_variables(teacher, batch)
    state = jaxkd.create(student=student, teacher=teacher, teacher_variables=tvars, method=method,
                         tx=optax.sgd(0.05, momentum=0.9), sample_batch=batch, rng=jax.random.PRNGKey(0))
    before = jax.tree_util.tree_map(np.array, state.trainable)  # the step donates the state's buffers
    step = jaxkd.make_train_step()
    for _ in range(steps):
        state, metrics = step(state, batch)
    return before, state, metrics


def test_kd3_and_lelp_train(tmp_path):
    batch = tiny_batch()
    teacher, _ = tiny_models()
    tvars = teacher_variables(teacher, batch)
    proj = methods.teacher_lelp_projections(teacher, tvars, [batch, tiny_batch(seed=1)], num_classes=NUM_CLASSES,
                                            subclasses=2)
    assert proj.shape == (NUM_CLASSES, 2, 33)
    path = str(tmp_path / "proj.npy")
    np.save(path, proj)
    method = methods.parse(f"ce + kd3(threshold=0.0) + lelp(projections={path!r}, predict_with_head=True)")
    before, state, metrics = _train(method, batch)
    for key in ("loss", "kd3", "kd3/kd", "kd3/feature", "kd3/classifier", "kd3/selected", "lelp"):
        assert np.isfinite(float(metrics[key])), key
    assert float(metrics["kd3/selected"]) == 1.0
    assert float(metrics["lelp"]) > 0
    # The connector (student 16 -> teacher 32), the LELP head and the student all moved.
    assert set(state.method.params["kd3"]) == {"connector"} and set(state.method.params["lelp"]) == {"head"}
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), before, state.trainable)
    assert all(jax.tree_util.tree_leaves(changed))
    # The projections are method state, kept as given; evaluation scores the LELP head's class marginals.
    np.testing.assert_allclose(state.method.state["lelp"]["projections"], proj, rtol=1e-6)
    _, student = tiny_models()
    out = student.apply(state.trained["student"].variables(), batch["image"], train=False)
    head = state.method.params["lelp"]["head"]
    sub = np.asarray(out.features["pooled"], np.float64) @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    sub = sub.reshape(len(sub), NUM_CLASSES, 2)
    expected = np.log(np.exp(sub).sum(-1))
    np.testing.assert_allclose(state.method_def.predict(state.method, out), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_classifier", [False, True])
def test_projections_from_moments_equal_the_svd_helper(with_classifier):
    """The in-step projections (eigh of moment covariances) equal the offline SVD helper's on the same data."""
    rng = np.random.default_rng(0)
    k, d, s = 3, 6, 2
    labels = np.repeat(np.arange(k), 20)
    scales = np.array([3.0, 2.0, 1.0, 0.5, 0.3, 0.1])
    f = rng.normal(size=(labels.size, d)) * scales + rng.normal(size=(k, d))[labels]
    w = rng.normal(size=(d, 2)) if with_classifier else None
    expected = losses.lelp_projections(f, labels, num_classes=k, subclasses=s, classifier_kernel=w)
    one_hot = np.eye(k)[labels]
    with jax.enable_x64(True):
        got = losses.lelp_projections_from_moments(
            one_hot.T @ f, np.einsum("bk,bd,be->kde", one_hot, f, f), one_hot.sum(0), subclasses=s,
            classifier_kernel=w,
        )
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8)


def test_lelp_without_projections_accumulates_the_teachers_moments_in_the_step():
    from tests.helpers import teacher_variables, tiny_batch, tiny_models

    teacher, student = tiny_models()
    batches = [tiny_batch(seed=i, batch_size=32) for i in (0, 1)]
    tvars = teacher_variables(teacher, batches[0])
    state = jaxkd.create(student=student, teacher=teacher, teacher_variables=tvars,
                         method=methods.parse("ce + lelp(subclasses=2)"),
                         tx=optax.sgd(0.05), sample_batch=batches[0], rng=jax.random.PRNGKey(0))
    step = jaxkd.make_train_step()
    for b in batches:
        state, metrics = step(state, b)
        assert np.isfinite(float(metrics["lelp"]))
    f = np.concatenate([np.asarray(teacher.apply(tvars, b["image"], train=False).features["pooled"]) for b in batches])
    y = np.concatenate([b["label"] for b in batches])
    st = state.method.state["lelp"]
    np.testing.assert_allclose(st["counts"], np.bincount(y, minlength=st["counts"].shape[0]))
    np.testing.assert_allclose(st["sums"], np.eye(st["counts"].shape[0])[y].T @ f, rtol=1e-5, atol=1e-5)
