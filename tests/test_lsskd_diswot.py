"""LSSKD and DisWOT: values against NumPy references, errors, the training-free ranking, and the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods, models
from jaxkd.methods.feature.lsskd import rotated_copies
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


def _dense_kernel_shapes(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [v.shape for path, v in flat
            if "Dense" in jax.tree_util.keystr(path) and jax.tree_util.keystr(path).endswith("['kernel']")]


def test_lsskd_and_diswot_in_the_train_step():
    teacher, student = tiny_conv_models()
    batch = tiny_image_batch()
    tvars = teacher.init(jax.random.PRNGKey(1), batch["image"])
    state = jaxkd.create(student=student, teacher=teacher, teacher_variables=tvars,
                         method=methods.parse("ce + lsskd + kd(temperature=4) + diswot + lsskd(rotations=False, name='plain')"),
                         tx=optax.sgd(0.05, momentum=0.9), sample_batch=batch, rng=jax.random.PRNGKey(0))
    # the rotation heads predict the 4·C joint (class, rotation) labels, the plain ones the C classes
    assert {s[-1] for s in _dense_kernel_shapes(state.method_vars.params["lsskd"])} == {4 * NUM_CLASSES}
    assert {s[-1] for s in _dense_kernel_shapes(state.method_vars.params["plain"])} == {NUM_CLASSES}
    heads = [np.array(x) for x in jax.tree_util.tree_leaves(state.method_vars.params["lsskd"])]  # the step donates
    new, metrics = jaxkd.make_train_step()(state, batch)
    for key in ("lsskd", "lsskd/ce_aux", "lsskd/kd_aux", "lsskd/kd_final", "diswot", "diswot/relation", "diswot/semantic",
                "plain", "plain/ce_aux", "plain/kd_aux", "plain/kd_final"):
        assert np.isfinite(float(metrics[key])), key
    # three joint classifiers start near 3·log(4·C), the plain ones near 3·log(C)
    assert float(metrics["lsskd/ce_aux"]) > float(metrics["plain/ce_aux"])
    after = jax.tree_util.tree_leaves(new.method_vars.params["lsskd"])
    assert any(not np.allclose(a, b) for a, b in zip(heads, after)), "the auxiliary classifiers did not train"


# ----- LSSKD's self-supervised augmented (class × rotation) task -----


def _np_lsskd_rotation_terms(z, a, y, T):
    """NumPy: a [B, L, M, C·M] joint logits of L classifiers on M transformed copies; joint label y·M + j
    and SLA's aggregate z̄_c = mean_j a[..., j, c·M + j], both written as explicit loops."""
    B, L, M, CM = a.shape
    C = CM // M
    ce, kd_aux, kd_final = [], [], []
    for i in range(B):
        lp = _log_softmax(z[i] / T)
        agg = np.zeros((L, C))
        c_i = 0.0
        for l in range(L):
            for j in range(M):
                c_i += -_log_softmax(a[i, l, j])[y[i] * M + j] / M
                for c in range(C):
                    agg[l, c] += a[i, l, j, c * M + j] / M
        lq = [_log_softmax(agg[l] / T) for l in range(L)]
        ce.append(c_i)
        kd_aux.append(T**2 * sum(np.sum(np.exp(lp) * (lp - lq[l])) for l in range(L)))
        q_bar = np.mean([np.exp(q) for q in lq], axis=0)
        kd_final.append(T**2 * np.sum(q_bar * (np.log(q_bar) - lp)))
    return np.array(ce), np.array(kd_aux), np.array(kd_final)


def test_lsskd_rotation_terms_match_a_numpy_reference():
    rng = np.random.default_rng(4)
    B, L, M, C = 5, 3, 4, 3
    z, a = rng.normal(size=(B, C)), 2.0 * rng.normal(size=(B, L, M, C * M))
    y = np.array([0, 2, 1, 2, 0])
    T = 2.5
    ref = _np_lsskd_rotation_terms(z, a, y, T)
    got = losses.lsskd_terms(z, a, z, a, y, temperature=T, transformations=M, reduction="none")
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    total = losses.lsskd(z, a, z, a, y, temperature=T, transformations=M, aux_ce_weight=0.5, aux_kd_weight=2.0,
                         final_kd_weight=0.3, reduction="none")
    np.testing.assert_allclose(total, 0.5 * ref[0] + 2.0 * ref[1] + 0.3 * ref[2], rtol=1e-5)


def test_lsskd_one_transformation_is_the_plain_form():
    """With M = 1 the joint label is the class and the aggregate is the classifier's own logits."""
    rng = np.random.default_rng(5)
    z, a, y = rng.normal(size=(4, 3)), rng.normal(size=(4, 2, 3)), np.array([0, 1, 2, 1])
    plain = losses.lsskd_terms(z, a, z, a, y, reduction="none")
    ref = _np_lsskd_rotation_terms(z, a[:, :, None, :], y, 3.0)
    for p, r in zip(plain, ref):
        np.testing.assert_allclose(p, r, rtol=1e-5, atol=1e-6)


def test_lsskd_rotation_errors():
    z, y = np.zeros((2, 3)), np.array([0, 1])
    a = np.zeros((2, 2, 4, 12))
    with pytest.raises(ValueError, match="transformations"):
        losses.lsskd(z, a, z, a, y, transformations=0)
    with pytest.raises(ValueError, match=r"aux_logits.*\(2, 2, 4, 11\)"):
        losses.lsskd(z, np.zeros((2, 2, 4, 11)), z, np.zeros((2, 2, 4, 11)), y, transformations=4)
    with pytest.raises(ValueError, match="aux_logits"):
        losses.lsskd(z, np.zeros((2, 2, 3, 12)), z, np.zeros((2, 2, 3, 12)), y, transformations=4)
    with pytest.raises(ValueError, match="rotations"):
        methods.lsskd(rotations="yes")
    with pytest.raises(ValueError, match="square"):
        rotated_copies(np.zeros((2, 4, 6, 1)))


def test_rotated_copies_rotate_nhwc_images():
    x = np.arange(2 * 3 * 3 * 2, dtype=np.float32).reshape(2, 3, 3, 2)
    r = np.asarray(rotated_copies(x))
    assert r.shape == (4, 2, 3, 3, 2)
    n = 3
    for b in range(2):
        for i in range(n):
            for j in range(n):
                np.testing.assert_array_equal(r[0, b, i, j], x[b, i, j])
                np.testing.assert_array_equal(r[1, b, i, j], x[b, j, n - 1 - i])  # 90° counter-clockwise
                np.testing.assert_array_equal(r[2, b, i, j], x[b, n - 1 - i, n - 1 - j])
                np.testing.assert_array_equal(r[3, b, i, j], x[b, n - 1 - j, i])
    # the NHWC form of HSAKD's torch.rot90(x, k, (2, 3)) on NCHW images
    nchw = x.transpose(0, 3, 1, 2)
    for k in range(4):
        np.testing.assert_array_equal(r[k], np.rot90(nchw, k, (2, 3)).transpose(0, 2, 3, 1))


@pytest.mark.slow  # 9 s: LSSKD's NumPy references and its train step stay in the suite; `pytest -m slow`
def test_lsskd_method_runs_the_heads_on_the_rotated_student():
    """The method's value equals the heads' joint logits on the student re-run on the rotated batch, built
    here in HSAKD's interleaved order (each image followed by its rotations), with BatchNorm in train mode."""
    from jaxkd.methods.features import module_apply
    from jaxkd.methods.feature.ofa import branch_heads

    _, student = tiny_conv_models()
    batch = tiny_image_batch(batch_size=4)
    x, y = batch["image"], batch["label"]
    svars = student.init(jax.random.PRNGKey(2), x)
    outs = student.apply(svars, x, train=True)
    inputs = methods.LossInputs.of(outs, None, batch, student_variables=svars, student_model=student)
    method = methods.lsskd(temperature=2.0)
    mvars = method.init(jax.random.PRNGKey(3), inputs)
    value, aux = method.loss(mvars, inputs, jax.random.PRNGKey(4))

    interleaved = np.stack([np.rot90(x, k, (1, 2)) for k in range(4)], 1).reshape(16, *x.shape[1:])
    rot_out = student.apply(svars, interleaved, train=True)
    heads = branch_heads(inputs, ("stage1", "stage2", "stage3"), width=None, embedding="pooled", method="lsskd",
                         teacher=None)
    joint = []
    for s in ("stage1", "stage2", "stage3"):
        out, _ = module_apply(heads[s].clone(num_classes=4 * NUM_CLASSES),
                              methods.MethodVars(mvars.params[s], mvars.state[s]), rot_out.features[s])
        assert out.shape == (16, 4 * NUM_CLASSES)
        joint.append(np.asarray(out).reshape(4, 4, 4 * NUM_CLASSES))  # [B, rotation, 4·C]
    joint = np.stack(joint, 1)  # [B, L, 4, 4·C]
    ce, kd_aux, kd_final = _np_lsskd_rotation_terms(np.asarray(outs.logits, np.float64), joint.astype(np.float64), y, 2.0)
    np.testing.assert_allclose(float(value), np.mean(ce + kd_aux + kd_final), rtol=2e-4)
    np.testing.assert_allclose(float(aux.metrics["ce_aux"]), np.mean(ce), rtol=2e-4)
