"""SP, CC and RKD: values against NumPy references written from RepDistiller's code, the relational
properties (batch order, rotation and scale), masks, bad inputs, and the methods in the jitted train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods
from tests.helpers import tiny_conv_models, tiny_image_batch, tiny_batch, tiny_models

# ----- NumPy references (RepDistiller's distiller_zoo/SP.py, CC.py, RKD.py, in float64) -----


def np_normalize_rows(x, eps=1e-12):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def np_sp(fs, ft):
    b = fs.shape[0]
    fs, ft = np.asarray(fs, np.float64).reshape(b, -1), np.asarray(ft, np.float64).reshape(b, -1)
    gs, gt = np_normalize_rows(fs @ fs.T), np_normalize_rows(ft @ ft.T)
    return np.sum((gt - gs) ** 2) / b**2


def np_cc(es, et):
    delta = np.abs(np.asarray(es, np.float64) - np.asarray(et, np.float64))
    return np.mean(np.sum(delta[:-1] * delta[1:], axis=1))


def np_smooth_l1(x):
    ax = np.abs(x)
    return np.where(ax < 1, 0.5 * x * x, ax - 0.5)


def np_pdist(e, eps=1e-12):
    sq = np.sum(e * e, axis=1)
    d = np.sqrt(np.clip(sq[:, None] + sq[None, :] - 2 * e @ e.T, eps, None))
    d[np.arange(len(e)), np.arange(len(e))] = 0
    return d


def np_rkd(s, t, wd=25.0, wa=50.0):
    b = s.shape[0]
    s, t = np.asarray(s, np.float64).reshape(b, -1), np.asarray(t, np.float64).reshape(b, -1)
    ds, dt = np_pdist(s), np_pdist(t)
    ds, dt = ds / ds[ds > 0].mean(), dt / dt[dt > 0].mean()
    loss_d = np.mean(np_smooth_l1(ds - dt))

    def angles(x):
        u = np_normalize_rows(x[None, :, :] - x[:, None, :])
        return np.einsum("ijd,ikd->ijk", u, u)

    loss_a = np.mean(np_smooth_l1(angles(s) - angles(t)))
    return wd * loss_d + wa * loss_a, loss_d, loss_a


# The losses compiled (eager dispatch of RKD's many small operations is slower than one compilation).
sp = jax.jit(losses.sp)
cc = jax.jit(losses.cc)
rkd = jax.jit(losses.rkd, static_argnames=("distance_weight", "angle_weight"))
rkd_terms = jax.jit(losses.rkd_terms)


def rand(seed, shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ----- values -----


@pytest.mark.parametrize("shapes", [((8, 4, 4, 3), (8, 4, 4, 6)), ((5, 7), (5, 3))])
def test_sp_matches_numpy(shapes):
    fs, ft = rand(0, shapes[0]), rand(1, shapes[1])
    np.testing.assert_allclose(sp(fs, ft), np_sp(fs, ft), rtol=1e-5)


def test_cc_matches_numpy():
    es, et = rand(2, (9, 6)), rand(3, (9, 6))
    np.testing.assert_allclose(cc(es, et), np_cc(es, et), rtol=1e-5)


def test_cc_with_a_mask_pairs_the_unmasked_examples_in_batch_order():
    es, et = rand(4, (7, 3)), rand(5, (7, 3))
    mask = np.array([1, 0, 1, 1, 0, 0, 1], bool)
    np.testing.assert_allclose(cc(es, et, mask=mask), np_cc(es[mask], et[mask]), rtol=1e-5)
    assert float(cc(es, et, mask=np.eye(7, dtype=bool)[2])) == 0.0  # one example: no pair


@pytest.mark.parametrize("wd, wa", [(25.0, 50.0), (1.0, 0.0), (0.0, 2.0)])
def test_rkd_matches_numpy(wd, wa):
    s, t = rand(6, (10, 5)), rand(7, (10, 8))
    expected, loss_d, loss_a = np_rkd(s, t, wd, wa)
    np.testing.assert_allclose(rkd(s, t, distance_weight=wd, angle_weight=wa), expected, rtol=1e-5)
    d, a = rkd_terms(s, t)
    np.testing.assert_allclose([d, a], [loss_d, loss_a], rtol=1e-5)


def test_rkd_of_maps_flattens_them():
    s, t = rand(8, (6, 2, 2, 3)), rand(9, (6, 2, 2, 4))
    np.testing.assert_allclose(rkd(s, t), np_rkd(s, t)[0], rtol=1e-5)


# ----- relational properties -----


def test_sp_is_invariant_to_the_order_of_the_batch():
    fs, ft = rand(10, (8, 2, 2, 4)), rand(11, (8, 2, 2, 6))
    perm = np.random.default_rng(0).permutation(8)
    np.testing.assert_allclose(sp(fs[perm], ft[perm]), sp(fs, ft), rtol=1e-5)


def orthogonal(seed, d):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


@pytest.mark.parametrize("seed", range(3))
def test_rkd_is_invariant_to_rotating_scaling_translating_and_reordering(seed):
    rng = np.random.default_rng(seed)
    s, t = rand(20 + seed, (7, 5)), rand(30 + seed, (7, 6))
    base = rkd(s, t)
    s2 = 3.7 * s @ orthogonal(seed, 5) + rng.normal(size=5).astype(np.float32)
    t2 = 0.2 * t @ orthogonal(seed + 10, 6) - 1.5
    np.testing.assert_allclose(rkd(s2, t), base, rtol=1e-4)
    np.testing.assert_allclose(rkd(s, t2), base, rtol=1e-4)
    np.testing.assert_allclose(rkd(s2, t2), base, rtol=1e-4)
    perm = rng.permutation(7)
    np.testing.assert_allclose(rkd(s[perm], t[perm]), base, rtol=1e-5)
    # A reflection is orthogonal too.
    np.testing.assert_allclose(rkd(s * np.array([-1, 1, 1, 1, 1], np.float32), t), base, rtol=1e-5)


def test_rkd_is_zero_for_a_rotated_scaled_copy_and_positive_otherwise():
    t = rand(40, (6, 4))
    assert float(rkd(2.0 * t @ orthogonal(1, 4), t)) == pytest.approx(0.0, abs=1e-6)
    assert float(rkd(rand(41, (6, 4)), t)) > 0


def test_identical_and_too_few_examples_are_finite():
    same = np.ones((4, 3), np.float32)
    value, grad = jax.jit(jax.value_and_grad(losses.rkd))(same, rand(42, (4, 3)))
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
    assert float(rkd(rand(43, (1, 3)), rand(44, (1, 3)))) == 0.0
    assert float(sp(rand(43, (4, 3)), rand(44, (4, 5)), mask=np.zeros(4, bool))) == 0.0
    g = jax.jit(jax.grad(lambda x: losses.sp(x, rand(45, (4, 5)))))(np.zeros((4, 3), np.float32))
    assert np.all(np.isfinite(g))


# ----- bad inputs -----


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"\(6, 3\).*\(5, 3\)"):
        losses.sp(np.zeros((6, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"\(6, 3\).*\(6, 4\)"):
        losses.cc(np.zeros((6, 3)), np.zeros((6, 4)))
    with pytest.raises(ValueError, match="batch size"):
        losses.rkd(np.zeros((6, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="distance_weight"):
        losses.rkd(np.zeros((6, 3)), np.zeros((6, 3)), distance_weight=-1.0)
    with pytest.raises(ValueError, match="angle_weight"):
        methods.rkd(angle_weight=float("nan"))
    with pytest.raises(ValueError, match="reduction"):
        losses.sp(np.zeros((6, 3)), np.zeros((6, 3)), reduction="sum")
    with pytest.raises(ValueError, match="mask"):
        losses.cc(np.zeros((6, 3)), np.zeros((6, 3)), mask=np.ones(5, bool))
    with pytest.raises(ValueError, match="embed_dim"):
        methods.cc(embed_dim=0)


def test_a_feature_the_model_lacks_is_named():
    teacher, student = tiny_models()
    batch = tiny_batch()
    with pytest.raises(ValueError, match="stage3"):
        jaxkd.create(student=student, teacher=teacher, teacher_variables=teacher.init(jax.random.PRNGKey(1), batch["image"]),
                     method=methods.parse("ce + sp"), tx=optax.sgd(0.1), sample_batch=batch, rng=jax.random.PRNGKey(0))


# ----- the methods in the jitted train step -----


def test_sp_cc_rkd_train_in_the_jitted_step():
    teacher, student = tiny_conv_models()
    batch = tiny_image_batch()
    tvars = teacher.init(jax.random.PRNGKey(1), batch["image"])
    state = jaxkd.create(student=student, teacher=teacher, teacher_variables=tvars,
                         method=methods.parse("ce + 3000 * sp + 0.02 * cc + rkd"), tx=optax.sgd(0.05, momentum=0.9),
                         sample_batch=batch, rng=jax.random.PRNGKey(0))
    embed = jax.device_get(state.method_vars.params["cc"])
    assert embed["embed_s"]["Dense_0"]["kernel"].shape == (64, 128)  # resnet8's pooled width -> 128
    # The first step's terms are the losses of the initial student's features (train mode).
    fs = jax.jit(lambda v, x: student.apply(v, x, train=True).features)(state.student.variables(), batch["image"])
    ft = jax.jit(lambda v, x: teacher.apply(v, x, train=False).features)(tvars, batch["image"])
    step = jaxkd.make_train_step()
    for i in range(2):
        state, metrics = step(state, batch)
        for name in ("sp", "cc", "rkd", "rkd/distance", "rkd/angle", "loss"):
            assert np.isfinite(float(metrics[name])), name
        assert float(metrics["sp"]) > 0 and float(metrics["rkd"]) > 0
        if i == 0:
            np.testing.assert_allclose(float(metrics["sp"]), np_sp(fs["stage3"], ft["stage3"]), rtol=1e-4)
            np.testing.assert_allclose(float(metrics["rkd"]), np_rkd(fs["pooled"], ft["pooled"])[0], rtol=1e-4)
    np.testing.assert_allclose(float(metrics["rkd"]), 25 * float(metrics["rkd/distance"]) + 50 * float(metrics["rkd/angle"]),
                               rtol=1e-5)
    after = jax.device_get(state.method_vars.params["cc"])
    for key in ("embed_s", "embed_t"):  # both embeddings are trained (the teacher's too, as RepDistiller's)
        assert not np.allclose(after[key]["Dense_0"]["kernel"], embed[key]["Dense_0"]["kernel"])
