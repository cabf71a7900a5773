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
from jaxkd.methods.feature.kd3 import mix_distribution
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
    proj = methods.lelp_projections(emb, labels, num_classes=2, subclasses=2)
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
    proj_null = methods.lelp_projections(emb, labels, num_classes=2, subclasses=1, classifier_kernel=kernel)
    top = proj_null[0, 0, :d] / np.linalg.norm(proj_null[0, 0, :d])
    assert abs(top[3]) > 0.99 and abs(top[2]) < 1e-9
    # A class without examples and directions without variance are all zeros (an equal split).
    proj3 = methods.lelp_projections(emb[:3].astype(np.float32), labels[:3], num_classes=2, subclasses=4)
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
        methods.lelp_projections(f, np.zeros(4, int), num_classes=3, subclasses=9)
    with pytest.raises(ValueError, match="labels must lie"):
        methods.lelp_projections(f, np.array([0, 1, 2, 3]), num_classes=3)
    with pytest.raises(ValueError, match="classifier_kernel"):
        methods.lelp_projections(f, np.zeros(4, int), num_classes=3, classifier_kernel=np.zeros((4, 3)))
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
    for key in ("loss", "kd3", "kd3/kd", "kd3/feature", "kd3/classifier", "kd3/alignment", "kd3/selected", "lelp"):
        assert np.isfinite(float(metrics[key])), key
    assert float(metrics["kd3/selected"]) == 1.0
    assert float(metrics["lelp"]) > 0
    # The connector (student 16 -> teacher 32), the LELP head and the student all moved.
    assert set(state.method_vars.params["kd3"]) == {"connector"} and set(state.method_vars.params["lelp"]) == {"head"}
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), before, state.trainable)
    assert all(jax.tree_util.tree_leaves(changed))
    # The projections are method state, kept as given; evaluation scores the LELP head's class marginals.
    np.testing.assert_allclose(state.method_vars.state["lelp"]["projections"], proj, rtol=1e-6)
    _, student = tiny_models()
    out = student.apply(state.trained["student"].variables(), batch["image"], train=False)
    head = state.method_vars.params["lelp"]["head"]
    sub = np.asarray(out.features["pooled"], np.float64) @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    sub = sub.reshape(len(sub), NUM_CLASSES, 2)
    expected = np.log(np.exp(sub).sum(-1))
    np.testing.assert_allclose(state.method.predict(state.method_vars, out), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_classifier", [False, True])
def test_projections_from_moments_equal_the_svd_helper(with_classifier):
    """The in-step projections (eigh of moment covariances) equal the offline SVD helper's on the same data."""
    rng = np.random.default_rng(0)
    k, d, s = 3, 6, 2
    labels = np.repeat(np.arange(k), 20)
    scales = np.array([3.0, 2.0, 1.0, 0.5, 0.3, 0.1])
    f = rng.normal(size=(labels.size, d)) * scales + rng.normal(size=(k, d))[labels]
    w = rng.normal(size=(d, 2)) if with_classifier else None
    expected = methods.lelp_projections(f, labels, num_classes=k, subclasses=s, classifier_kernel=w)
    one_hot = np.eye(k)[labels]
    with jax.enable_x64(True):
        got = methods.lelp_projections_from_moments(
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
    st = state.method_vars.state["lelp"]
    np.testing.assert_allclose(st["counts"], np.bincount(y, minlength=st["counts"].shape[0]))
    np.testing.assert_allclose(st["sums"], np.eye(st["counts"].shape[0])[y].T @ f, rtol=1e-5, atol=1e-5)


# ----- KD³'s MixDistribution block: the perturbation and the instance alignment -----


def _np_infonce(s, t, tau):
    """−mean_i log softmax_j(cos(s_i, t_j)/τ)_i, written directly from the formula."""
    s = np.asarray(s, np.float64)
    t = np.asarray(t, np.float64)
    s = s / np.linalg.norm(s, axis=1, keepdims=True)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    logits = s @ t.T / tau
    logits = logits - logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -np.mean(np.diag(log_p))


def test_kd3_instance_alignment_matches_numpy():
    rng = np.random.default_rng(5)
    s, t = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    np.testing.assert_allclose(losses.kd3_instance_alignment(s, t, temperature=0.3), _np_infonce(s, t, 0.3), rtol=1e-5)
    # The default temperature, and the mask: the loss of the valid examples alone.
    mask = np.array([1, 1, 0, 1, 0, 1, 1], bool)
    np.testing.assert_allclose(losses.kd3_instance_alignment(s, t, mask=mask), _np_infonce(s[mask], t[mask], 0.07),
                               rtol=1e-5)
    # Invariant to the embeddings' scale (cosine similarity); a perfectly aligned, well separated batch costs ~0.
    np.testing.assert_allclose(losses.kd3_instance_alignment(3.0 * s, 0.5 * t, temperature=0.3),
                               _np_infonce(s, t, 0.3), rtol=1e-5)
    eye = np.eye(4)
    assert float(losses.kd3_instance_alignment(eye, 2.0 * eye, temperature=0.05)) < 1e-6
    # One valid example: its only candidate is its positive (0); none: 0, not NaN.
    one = np.array([True] + [False] * 6)
    assert abs(float(losses.kd3_instance_alignment(s, t, mask=one))) < 1e-6
    assert float(losses.kd3_instance_alignment(s, t, mask=np.zeros(7, bool))) == 0.0


def _np_stats(x, eps):
    mu = x.mean(axis=(1, 2), keepdims=True)
    return mu, np.sqrt(x.var(axis=(1, 2), keepdims=True) + eps)


def test_mix_distribution_closed_form_and_identity():
    rng = np.random.default_rng(6)
    b = 6
    # Examples with different per-channel means and scales (NHWC, 3 channels).
    x = rng.normal(size=(b, 5, 4, 3)) * rng.uniform(0.5, 3.0, size=(b, 1, 1, 3)) + rng.normal(size=(b, 1, 1, 3))
    x = x.astype(np.float32)
    lam = np.array([0.0, 0.25, 0.5, 0.9, 1.0, 0.3], np.float32)
    partner = np.array([3, 0, 5, 1, 2, 4])
    eps = 1e-6
    got = mix_distribution(jax.random.PRNGKey(0), x, eps=eps, mix_weight=lam, partner=partner)
    assert got.shape == x.shape and got.dtype == x.dtype
    mu, sig = _np_stats(x.astype(np.float64), eps)
    l = lam.reshape(b, 1, 1, 1)
    mu_mix = l * mu + (1 - l) * mu[partner]
    sig_mix = l * sig + (1 - l) * sig[partner]
    expected = sig_mix * (x - mu) / sig + mu_mix
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # λ = 0: example i takes its partner's statistics (mean exactly, std up to eps).
    got_mu, got_sig = _np_stats(np.asarray(got, np.float64), 0.0)
    np.testing.assert_allclose(got_mu[0], mu[3], atol=1e-5)
    np.testing.assert_allclose(got_sig[0], sig[3], rtol=1e-4)
    # The mixing weight 1 returns the input, whatever the partner.
    same = mix_distribution(jax.random.PRNGKey(1), x, mix_weight=1.0, partner=partner)
    np.testing.assert_allclose(same, x, rtol=1e-5, atol=1e-5)
    # A [B, D] input has one channel: its D values.
    v = rng.normal(size=(4, 7)).astype(np.float32)
    got_v = mix_distribution(jax.random.PRNGKey(0), v, mix_weight=0.5, partner=np.array([1, 0, 3, 2]))
    m, sd = v.mean(1, keepdims=True), np.sqrt(v.var(1, keepdims=True) + 1e-6)
    p = np.array([1, 0, 3, 2])
    np.testing.assert_allclose(got_v, (0.5 * sd + 0.5 * sd[p]) * (v - m) / sd + 0.5 * m + 0.5 * m[p], rtol=1e-5,
                               atol=1e-5)


def test_mix_distribution_draws_keep_each_examples_content():
    rng = np.random.default_rng(7)
    b = 8
    x = (rng.normal(size=(b, 6, 6, 2)) * rng.uniform(0.5, 3.0, size=(b, 1, 1, 2))
         + 5.0 * rng.normal(size=(b, 1, 1, 2))).astype(np.float32)
    draw = jax.jit(lambda key, x: mix_distribution(key, x, alpha=0.5))  # jittable
    got = np.asarray(draw(jax.random.PRNGKey(3), x), np.float64)
    assert got.shape == x.shape
    # Content: each perturbed example, standardized per channel, is the original standardized example.
    mu, sig = _np_stats(x.astype(np.float64), 0.0)
    gmu, gsig = _np_stats(got, 0.0)
    np.testing.assert_allclose((got - gmu) / gsig, (x - mu) / sig, rtol=1e-4, atol=1e-4)
    # The new statistics are one λ_i-mix of the example's and one partner's, the same λ_i for every channel.
    for i in range(b):
        found = False
        for j in range(b):
            d = mu[j, 0, 0, 0] - mu[i, 0, 0, 0]
            if j == i or abs(d) < 1e-3:
                continue
            one_minus = (gmu[i, 0, 0, 0] - mu[i, 0, 0, 0]) / d
            lam = 1.0 - one_minus
            pred_mu = lam * mu[i] + (1 - lam) * mu[j]
            pred_sig = lam * sig[i] + (1 - lam) * sig[j]
            if (-1e-4 <= lam <= 1 + 1e-4 and np.allclose(pred_mu, gmu[i], atol=1e-3)
                    and np.allclose(pred_sig, gsig[i], rtol=1e-3, atol=1e-3)):
                found = True
        # A draw of λ_i within float precision of 1 or a self-partner leaves the example as it was.
        assert found or np.allclose(got[i], x[i], atol=1e-3), i
    # Another key, another perturbation.
    assert not np.allclose(draw(jax.random.PRNGKey(4), x), got, atol=1e-3)
    # The mask: masked examples are never partners and stay as they were.
    mask = np.array([1, 1, 0, 1, 1, 0, 1, 1], bool)
    far = x.copy()
    far[~mask] += 1000.0
    draw_masked = jax.jit(lambda key, x, mask: mix_distribution(key, x, alpha=1.0, mask=mask))
    with_mask = np.asarray(draw_masked(jax.random.PRNGKey(5), far, mask))
    np.testing.assert_allclose(with_mask[~mask], far[~mask], rtol=1e-5)
    assert np.abs(with_mask[mask].mean(axis=(1, 2))).max() < 100.0


def test_kd3_alignment_term_is_the_infonce_of_the_rerun_student_on_the_mixed_batch():
    from jaxkd.methods.base import LossInputs

    teacher, student = tiny_models()
    batch = tiny_batch(batch_size=8)
    tvars = teacher_variables(teacher, batch)
    svars = student.init(jax.random.PRNGKey(2), batch["image"])
    s_out = student.apply(svars, batch["image"], train=True)
    t_out = teacher.apply(tvars, batch["image"], train=False)
    inputs = LossInputs.of(s_out, t_out, batch, student_variables=svars, student_model=student)
    method = methods.kd3(classifier_weight=0.0, alignment_weight=0.5, alignment_temperature=0.5, mix_alpha=0.3)
    mvars = method.init(jax.random.PRNGKey(3), inputs)
    loss = jax.jit(lambda key: method.loss(mvars, inputs, key))
    key = jax.random.PRNGKey(4)
    value, aux = loss(key)
    dense = mvars.params["connector"]["Dense_0"]
    mixed = mix_distribution(key, batch["image"], alpha=0.3)
    s_mix = np.asarray(student.apply(svars, mixed, train=True).features["pooled"], np.float64)
    s_mix = s_mix @ np.asarray(dense["kernel"], np.float64) + np.asarray(dense["bias"], np.float64)
    expected = _np_infonce(s_mix, t_out.features["pooled"], 0.5)
    np.testing.assert_allclose(aux.metrics["alignment"], expected, rtol=1e-4)
    m = aux.metrics
    np.testing.assert_allclose(value, m["kd"] + m["feature"] + 0.5 * m["alignment"], rtol=1e-5)
    # The perturbation is drawn from the step's rng; alignment_weight=0 leaves the term (and the re-run) out.
    _, aux2 = loss(jax.random.PRNGKey(5))
    assert float(aux2.metrics["alignment"]) != float(m["alignment"])
    without = methods.kd3(classifier_weight=0.0, alignment_weight=0.0)
    _, aux0 = jax.jit(lambda key: without.loss(mvars, inputs, key))(key)
    assert "alignment" not in aux0.metrics


def test_kd3_mix_distribution_bad_inputs():
    s, t = np.zeros((4, 3)), np.zeros((4, 3))
    with pytest.raises(ValueError, match="temperature"):
        losses.kd3_instance_alignment(s, t, temperature=0.0)
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 5\)"):
        losses.kd3_instance_alignment(s, np.zeros((4, 5)))
    with pytest.raises(ValueError, match="reduction"):
        losses.kd3_instance_alignment(s, t, reduction="none")
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="alpha"):
        mix_distribution(key, np.zeros((4, 2, 2, 1)), alpha=0.0)
    with pytest.raises(ValueError, match="float inputs"):
        mix_distribution(key, np.zeros((4, 2, 2, 1), np.int32))
    with pytest.raises(ValueError, match="mix_weight"):
        mix_distribution(key, np.zeros((4, 2, 2, 1)), mix_weight=np.ones(3))
    with pytest.raises(ValueError, match="partner"):
        mix_distribution(key, np.zeros((4, 2, 2, 1)), partner=np.arange(3))
    with pytest.raises(ValueError, match="alignment_weight"):
        methods.kd3(alignment_weight=-1.0)
    with pytest.raises(ValueError, match="alignment_temperature"):
        methods.kd3(alignment_temperature=0.0)
    with pytest.raises(ValueError, match="mix_alpha"):
        methods.kd3(mix_alpha=0.0)
