"""FSP, KD-SVD and PKT (jaxkd/losses/{fsp,kdsvd,pkt}.py, jaxkd/methods/{fsp,kdsvd,pkt}.py): values against
NumPy references written from RepDistiller's code (NCHW layout, its pooling, its SVD alignment, the
authors' PKT), properties, bad inputs, and the three methods in the jitted train step.

Finite-difference gradients, bfloat16, jit == eager, masks (PKT: the subset's loss):
tests/test_feature_contract.py.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods, models

from tests.helpers import NUM_CLASSES, tiny_conv_models, tiny_image_batch

RNG = np.random.default_rng(0)


def nchw(x):
    return np.transpose(np.asarray(x, np.float64), (0, 3, 1, 2))


def np_pool_to(x, size):
    """adaptive_avg_pool2d of NCHW x to size x size when H is a multiple of size."""
    b, c, h, w = x.shape
    return x.reshape(b, c, size, h // size, size, w // size).mean(axis=(3, 5))


def np_fsp_matrix(bot, top):
    """RepDistiller FSP.compute_fsp for one pair: [B, C_top, C_bot]."""
    bot, top = nchw(bot), nchw(top)
    if bot.shape[2] > top.shape[2]:
        bot = np_pool_to(bot, top.shape[2])
    elif bot.shape[2] < top.shape[2]:
        top = np_pool_to(top, bot.shape[2])
    b = bot.reshape(bot.shape[0], 1, bot.shape[1], -1)
    t = top.reshape(top.shape[0], top.shape[1], 1, -1)
    return (b * t).mean(-1)


def test_fsp_matches_repdistiller():
    sl, su, tl, tu = (RNG.normal(size=s) for s in ((4, 4, 4, 3), (4, 2, 2, 5), (4, 4, 4, 3), (4, 2, 2, 5)))
    expected = ((np_fsp_matrix(sl, su) - np_fsp_matrix(tl, tu)) ** 2).mean(axis=(1, 2))
    np.testing.assert_allclose(losses.fsp(sl, su, tl, tu, reduction="none"), expected, rtol=1e-5)
    np.testing.assert_allclose(np.swapaxes(losses.fsp_matrix(sl, su), 1, 2), np_fsp_matrix(sl, su), rtol=1e-5, atol=1e-8)
    # Same resolution, upper map pooled when it is the larger one.
    np.testing.assert_allclose(np.swapaxes(losses.fsp_matrix(su, sl), 1, 2), np_fsp_matrix(su, sl), rtol=1e-5, atol=1e-8)


def test_fsp_refuses_channels_that_differ():
    with pytest.raises(ValueError, match=r"lower maps are student \(2, 2, 2, 3\) and teacher \(2, 2, 2, 4\)"):
        losses.fsp(np.ones((2, 2, 2, 3)), np.ones((2, 2, 2, 5)), np.ones((2, 2, 2, 4)), np.ones((2, 2, 2, 5)))


# ----- KD-SVD -----


def np_svd(f, n):
    """RepDistiller KDSVD.svd: x = [H·W, C] per example, torch.svd (reduced), first n columns normalized."""
    f = nchw(f)
    x = np.transpose(f.reshape(f.shape[0], f.shape[1], -1), (0, 2, 1))
    vs, ss = [], []
    for m in x:
        _, s, vt = np.linalg.svd(m, full_matrices=False)
        v = vt.T[:, :n]
        vs.append(v / np.linalg.norm(v, axis=0, keepdims=True))
        ss.append(s[:n] / np.linalg.norm(s[:n]))
    return np.stack(vs), np.stack(ss)


def np_kdsvd(sl, su, tl, tu, k, teacher_signs):
    """RepDistiller KDSVD.forward for one pair of layers, per example (loss.sum() / bsz is their mean).
    ``teacher_signs[layer]``: ±1 per teacher vector — SVD fixes each singular vector only up to its sign."""
    out = 0.0
    vs = []
    for layer, (fs, ft) in enumerate(((sl, tl), (su, tu))):
        v_t, s_t = np_svd(ft, k)
        v_t = v_t * teacher_signs[layer]
        v_s, _ = np_svd(fs, k + 3)
        cosine = np.einsum("bcm,bcn->bmn", v_s, v_t)
        best = np.abs(cosine).max(1, keepdims=True)
        v_s = np.einsum("bcm,bmn->bcn", v_s, np.where(np.abs(cosine) == best, np.sign(cosine), 0.0))
        vs.append((v_s * s_t[:, None, :], v_t * s_t[:, None, :]))
    (s_low, t_low), (s_up, t_up) = vs

    def rbf(up, low):
        return np.exp(-((up[:, :, None, :] - low[:, None, :, :]) ** 2) / 8)

    out = ((rbf(s_up, s_low) - rbf(t_up, t_low)) ** 2).sum(axis=(1, 2, 3))
    return out


@pytest.mark.parametrize("k", [1, 2])
def test_kdsvd_matches_repdistiller_for_some_choice_of_singular_vector_signs(k):
    tl, tu = RNG.normal(size=(3, 4, 4, 3)), RNG.normal(size=(3, 2, 2, 6))
    sl, su = tl + 0.3 * RNG.normal(size=tl.shape), tu + 0.3 * RNG.normal(size=tu.shape)
    got = np.asarray(losses.kdsvd(sl, su, tl, tu, k=k, reduction="none"))
    # The official loss depends on the (arbitrary) sign LAPACK gives each teacher singular vector; the
    # student's are aligned to them. The value must be the official one for one of the sign choices.
    candidates = [np_kdsvd(sl, su, tl, tu, k, (np.array(a), np.array(b)))
                  for a in itertools.product((1.0, -1.0), repeat=k) for b in itertools.product((1.0, -1.0), repeat=k)]
    errors = np.min([np.abs(c - got) for c in candidates], axis=0)
    np.testing.assert_array_less(errors, 1e-5 * np.maximum(1.0, np.abs(got)))
    # A student equal to its teacher is aligned exactly: zero loss.
    np.testing.assert_allclose(losses.kdsvd(tl, tu, tl, tu, k=k, reduction="none"), 0.0, atol=1e-10)


def test_kdsvd_gradient_is_finite_for_rank_deficient_maps():
    # Wide maps (4 positions < 6 channels) with two all-zero positions: the trailing singular values are
    # repeated zeros, where the full SVD's derivative is NaN. Only the leading vectors are differentiated.
    t = RNG.normal(size=(2, 2, 2, 6))
    s = t + 0.3 * RNG.normal(size=t.shape)
    s[:, 1, :, :] = 0.0
    lower_t = RNG.normal(size=(2, 3, 3, 6))
    lower_s = lower_t + 0.3 * RNG.normal(size=lower_t.shape)
    with jax.enable_x64(True):
        f = lambda x: losses.kdsvd(lower_s, x, lower_t, t)
        grad = np.asarray(jax.grad(f)(jnp.asarray(s)))
        assert np.all(np.isfinite(grad))
        ours = jax.grad(lambda x: jnp.sum(losses.top_right_singular_vectors(x, 1)[0] ** 3))(jnp.asarray(s))
        assert np.all(np.isfinite(np.asarray(ours)))
        eps = 1e-6
        for index in [(0, 0, 0, 1), (1, 1, 0, 3), (0, 1, 1, 5)]:
            d = np.zeros_like(s)
            d[index] = eps
            np.testing.assert_allclose(grad[index], (f(s + d) - f(s - d)) / (2 * eps), rtol=1e-5, atol=1e-9)


def test_kdsvd_refuses_bad_inputs():
    with pytest.raises(ValueError, match=r"upper maps are student \(2, 2, 2, 3\) and teacher \(2, 2, 2, 4\)"):
        losses.kdsvd(np.ones((2, 2, 2, 3)), np.ones((2, 2, 2, 3)), np.ones((2, 2, 2, 3)), np.ones((2, 2, 2, 4)))
    with pytest.raises(ValueError, match="k must"):
        methods.kdsvd(k=0)
    with pytest.raises(ValueError, match="at least 2 names"):
        methods.kdsvd(student_features=("stage3",))


# ----- PKT -----


def np_pkt(f_s, f_t, eps=1e-7):
    """The authors' cosine_similarity_loss (RepDistiller distiller_zoo/PKT.py)."""
    def conditional(x):
        x = np.asarray(x, np.float64).reshape(len(x), -1)
        x = x / (np.sqrt((x ** 2).sum(1, keepdims=True)) + eps)
        k = (x @ x.T + 1.0) / 2.0
        return k / k.sum(1, keepdims=True)
    p, q = conditional(f_s), conditional(f_t)
    return np.mean(q * np.log((q + eps) / (p + eps)))


def test_pkt_matches_the_authors_code():
    s, t = RNG.normal(size=(7, 5)), RNG.normal(size=(7, 9))
    np.testing.assert_allclose(losses.pkt(s, t), np_pkt(s, t), rtol=1e-5)
    np.testing.assert_allclose(losses.pkt(s, t, eps=1e-3), np_pkt(s, t, 1e-3), rtol=1e-5)
    maps = RNG.normal(size=(7, 2, 2, 3))
    np.testing.assert_allclose(losses.pkt(maps, t), np_pkt(maps, t), rtol=1e-5)
    # Relational: invariant to the order of the batch and zero when the similarities agree.
    order = RNG.permutation(7)
    np.testing.assert_allclose(losses.pkt(s[order], t[order]), losses.pkt(s, t), rtol=1e-5)
    rotation = np.linalg.qr(RNG.normal(size=(5, 5)))[0]
    assert abs(float(losses.pkt(s @ rotation * 3.0, s))) < 1e-6
    # The mask: the subset's loss, whatever the masked rows hold.
    mask = np.array([True, False, True, True, False, True, True])
    np.testing.assert_allclose(losses.pkt(s, t, mask=mask), np_pkt(s[mask], t[mask]), rtol=1e-5)


def test_pkt_refuses_bad_inputs():
    with pytest.raises(ValueError, match="batch sizes"):
        losses.pkt(np.ones((3, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="eps"):
        losses.pkt(np.ones((3, 2)), np.ones((3, 2)), eps=0.0)
    with pytest.raises(ValueError, match="reduction"):
        losses.pkt(np.ones((3, 2)), np.ones((3, 2)), reduction="sum")


# ----- methods -----

TEACHER, STUDENT = tiny_conv_models()
BATCH = tiny_image_batch()
TVARS = TEACHER.init(jax.random.PRNGKey(1), BATCH["image"])


def test_fsp_kdsvd_and_pkt_run_in_the_jitted_train_step():
    state = jaxkd.create(student=STUDENT, teacher=TEACHER, teacher_variables=TVARS,
                         method=methods.parse("ce + fsp + kdsvd + 30000 * pkt"), tx=optax.sgd(0.05, momentum=0.9),
                         sample_batch=BATCH, rng=jax.random.PRNGKey(0))
    step = jaxkd.make_train_step()
    for _ in range(2):
        state, metrics = step(state, BATCH)
        assert float(metrics["skipped"]) == 0.0 and np.isfinite(float(metrics["grad_norm"]))
    for name, pairs in (("fsp", ("stem-stage1", "stage1-stage2", "stage2-stage3")),
                        ("kdsvd", ("stage1-stage2", "stage2-stage3"))):
        parts = [float(metrics[f"{name}/{p}"]) for p in pairs]
        assert all(np.isfinite(parts))
        np.testing.assert_allclose(sum(parts), float(metrics[name]), rtol=1e-5)
    assert np.isfinite(float(metrics["pkt"])) and float(metrics["pkt"]) > 0


def test_channel_mismatches_are_refused_when_the_state_is_created():
    wide = models.get("resnet8x4", num_classes=NUM_CLASSES)  # stem 32 channels, the student's 16
    wide_vars = jax.jit(wide.init)(jax.random.PRNGKey(1), BATCH["image"])  # one compile, not one per op
    for spec, match in (("fsp", r"fsp: features 'stem', 'stage1'"), ("kdsvd", r"kdsvd: features 'stage1', 'stage2'")):
        with pytest.raises(ValueError, match=match):
            jaxkd.create(student=STUDENT, teacher=wide, teacher_variables=wide_vars, method=methods.parse(spec),
                         tx=optax.sgd(0.1), sample_batch=BATCH, rng=jax.random.PRNGKey(0))


def test_fsp_as_a_first_stage():
    chain = methods.parse("until(5) * fsp + after(5) * ce")
    assert [(m.name, float(m.weight(4)), float(m.weight(5))) for m in chain.terms] == [("fsp", 1.0, 0.0), ("ce", 0.0, 1.0)]
