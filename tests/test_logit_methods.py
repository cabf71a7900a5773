"""DKD, logit standardization, DIST, NKD, PLD, SinKD, BD-KD, Swing and BinaryKL-Norm against NumPy
references written from the formulas (loops, float64), plus properties, gradients, dtypes, masking and
argument checks, and the method transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxkd
from jaxkd import losses
from jaxkd.losses import logit_methods as lm
from jaxkd.methods import LossInputs, chain
from jaxkd.methods import logit_methods as mm
from jaxkd.models import Outputs

from tests.helpers import teacher_variables, tiny_batch, tiny_models


# ----- NumPy references (float64, explicit loops) -----

def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_softmax(z):
    return np.exp(np_log_softmax(z))


def np_kl(p, q):
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    return float(np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(np.where(p > 0, q, 1))), 0.0)))


def rand_logits(seed, shape, scale=3.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def np_dkd_official(zs, zt, y, T):
    """mdistiller's dkd_loss: binary split from the full softmax, NCKD with the −1000 trick."""
    B, C = zs.shape
    tckd = nckd = 0.0
    for n in range(B):
        g = np.eye(C)[y[n]]
        ps, pt = np_softmax(zs[n] / T), np_softmax(zt[n] / T)
        bs = np.array([(ps * g).sum(), (ps * (1 - g)).sum()])
        bt = np.array([(pt * g).sum(), (pt * (1 - g)).sum()])
        tckd += np.sum(bt * (np.log(bt) - np.log(bs)))
        lps, lpt = np_log_softmax(zs[n] / T - 1000 * g), np_log_softmax(zt[n] / T - 1000 * g)
        nckd += np.sum(np.exp(lpt) * (lpt - lps))
    return T**2 * tckd / B, T**2 * nckd / B


def np_standardize(z, eps=1e-7):
    z = np.asarray(z, np.float64)
    out = np.full_like(z, -np.inf)
    for n in range(z.shape[0]):
        keep = np.isfinite(z[n])
        v = z[n][keep]
        out[n][keep] = (v - v.mean()) / (eps + v.std(ddof=1))
    return out


def np_pearson(a, b, eps=1e-8):
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + eps)


def np_dist(zs, zt, beta, gamma, tau):
    ys, yt = np_softmax(zs / tau), np_softmax(zt / tau)
    inter = 1 - np.mean([np_pearson(ys[n], yt[n]) for n in range(ys.shape[0])])
    intra = 1 - np.mean([np_pearson(ys[:, c], yt[:, c]) for c in range(ys.shape[1])])
    return tau**2 * (beta * inter + gamma * intra)


def np_nkd(zs, zt, y, temp, gamma):
    B, C = zs.shape
    target = nontarget = 0.0
    for n in range(B):
        target += -np_softmax(zt[n])[y[n]] * np_log_softmax(zs[n])[y[n]]
        keep = np.arange(C) != y[n]
        t_hat = np_softmax(zt[n][keep] / temp)
        nontarget += -gamma * temp**2 * np.sum(t_hat * np_log_softmax(zs[n][keep] / temp))
    return target / B, nontarget / B


def np_pld_example(s, t, label, tau):
    C = len(s)
    others = sorted((c for c in range(C) if c != label), key=lambda c: (-t[c], c))
    perm = [label] + others
    alpha = np_softmax(np.asarray(t, np.float64) / tau)
    total = 0.0
    for k in range(C):
        rest = [s[perm[l]] for l in range(k, C)]
        total += alpha[perm[k]] * (np.log(np.sum(np.exp(np.asarray(rest, np.float64)))) - s[perm[k]])
    return total


def np_sinkhorn_official(zs, zt, T, eps, iters):
    """The official loop: plain (non-log) Sinkhorn with all-ones marginals."""
    ps, pt = np_softmax(zs / T), np_softmax(zt / T)
    B = ps.shape[0]
    W = np.array([[np.abs(ps[i] - pt[j]).sum() for j in range(B)] for i in range(B)])
    P = np.exp(-W / eps)
    for _ in range(iters):
        P = P / P.sum(1, keepdims=True)
        P = P / P.sum(0, keepdims=True)
    return float((P * W).sum()), P


def np_entropy(p):
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0.0))


def np_bdkd(zs, zt, T):
    out = []
    for n in range(zs.shape[0]):
        ps, pt = np_softmax(zs[n] / T), np_softmax(zt[n] / T)
        hs, ht = np_entropy(ps), np_entropy(pt)
        wf = ht / (hs + ht)
        out.append(T**2 * (wf * np_kl(pt, ps) + (1 - wf) * np_kl(ps, pt)))
    return np.mean(out)


def np_binary_kl_norm(zs, zt, T, eps=1e-8):
    d = np.clip(1 / (1 + np.exp(-(zs.astype(np.float64) - zt) / T)), eps, 1 - eps)
    return T**2 * np.sum(0.5 * np.log(0.5 / d) + 0.5 * np.log(0.5 / (1 - d))) / zs.shape[0]


# ----- DKD -----

def test_dkd_matches_official_code_with_the_minus_1000_trick():
    zs, zt = rand_logits(0, (6, 5)), rand_logits(1, (6, 5))
    y = np.random.default_rng(2).integers(0, 5, 6).astype(np.int32)
    tckd_ref, nckd_ref = np_dkd_official(zs, zt, y, 4.0)
    tckd, nckd = lm.dkd_terms(zs, zt, y, temperature=4.0)
    np.testing.assert_allclose(tckd, tckd_ref, rtol=1e-4)
    np.testing.assert_allclose(nckd, nckd_ref, rtol=1e-4)
    np.testing.assert_allclose(
        lm.dkd(zs, zt, y, alpha=1.0, beta=8.0, temperature=4.0), tckd_ref + 8 * nckd_ref, rtol=1e-4
    )
    # In NumPy too: the −1000 trick equals the softmax over the non-target classes with the target deleted.
    direct = 16 * np.mean([
        np_kl(np_softmax(np.delete(zt[n], y[n]) / 4), np_softmax(np.delete(zs[n], y[n]) / 4)) for n in range(6)
    ])
    np.testing.assert_allclose(direct, nckd_ref, rtol=1e-10)


def test_dkd_decomposition_identity_kd_equals_tckd_plus_weighted_nckd():
    # DKD paper, Eq. 1 (with T² on every term): T²·KL(p^T‖p^S) = TCKD + (1 − p^T_y)·NCKD per example.
    zs, zt = rand_logits(3, (6, 5)), rand_logits(4, (6, 5))
    y = np.array([0, 4, 3, 3, 1, 2], np.int32)
    T = 2.0
    tckd, nckd = lm.dkd_terms(zs, zt, y, temperature=T, reduction="none")
    kd = T**2 * losses.kl_per_example(zt, zs, temperature=T)
    pt_y = np_softmax(zt / T)[np.arange(6), y]
    np.testing.assert_allclose(kd, np.asarray(tckd) + (1 - pt_y) * np.asarray(nckd), rtol=1e-4, atol=1e-6)


def test_dkd_binary_task_nckd_is_zero_not_inf():
    # mdistiller#60: with C = 2 the single non-target class makes NCKD 0 (the −1000 trick gave inf).
    zs = np.array([[30.0, -30.0], [0.5, 0.2], [-4.0, 9.0]], np.float32)
    zt = np.array([[-25.0, 25.0], [0.1, 0.3], [8.0, -8.0]], np.float32)
    y = np.array([0, 1, 1])
    for dtype in (jnp.float32, jnp.bfloat16):
        s, t = jnp.asarray(zs, dtype), jnp.asarray(zt, dtype)
        tckd, nckd = lm.dkd_terms(s, t, y, temperature=4.0, reduction="none")
        assert np.all(np.asarray(nckd) == 0.0) and np.all(np.isfinite(tckd))
        g = jax.grad(lambda s: lm.dkd(s, t, y, beta=8.0))(jnp.asarray(zs))
        assert np.all(np.isfinite(g))
    # The binary split is taken in log space: probabilities that underflow (official: log(0) = -inf -> inf)
    # still give a finite TCKD, here KL([e^-1000, 1] ‖ [1, e^-1000]) = 1000.
    extreme = lm.dkd_terms(np.array([[500.0, -500.0]]), np.array([[-500.0, 500.0]]), np.array([0]), temperature=1.0)
    np.testing.assert_allclose(extreme[0], 1000.0, rtol=1e-5)
    assert float(extreme[1]) == 0.0
    # TCKD alone is KL between the two binary distributions, i.e. the whole KL for C = 2.
    full_kl = 16 * np.mean([np_kl(np_softmax(zt[n] / 4), np_softmax(zs[n] / 4)) for n in range(3)])
    np.testing.assert_allclose(lm.dkd_terms(zs, zt, y, temperature=4.0)[0], full_kl, rtol=1e-4)


def test_dkd_standardize_is_dkd_on_standardized_logits():
    zs, zt = rand_logits(5, (6, 5)), rand_logits(6, (6, 5))
    y = np.array([1, 2, 0, 4, 4, 3], np.int32)
    tckd_ref, nckd_ref = np_dkd_official(np_standardize(zs), np_standardize(zt), y, 2.0)
    np.testing.assert_allclose(
        lm.dkd(zs, zt, y, alpha=1.0, beta=2.0, temperature=2.0, standardize=True), tckd_ref + 2 * nckd_ref, rtol=1e-4
    )


# ----- logit standardization -----

def test_standardize_logits_uses_unbiased_std_over_finite_entries():
    z = rand_logits(7, (6, 5))
    z[1, [0, 3]] = -np.inf
    out = np.asarray(lm.standardize_logits(z))
    ref = np_standardize(z)
    assert np.all(np.isneginf(out[1, [0, 3]]))
    np.testing.assert_allclose(out[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-5, atol=1e-6)
    one = np.array([[-np.inf, 2.0, -np.inf]], np.float32)  # a single finite entry: std 0 -> 0, not NaN
    np.testing.assert_array_equal(lm.standardize_logits(one), [[-np.inf, 0.0, -np.inf]])


def test_ls_kd_matches_numpy():
    zs, zt = rand_logits(8, (6, 5)), rand_logits(9, (6, 5))
    tau = 2.0
    Zs, Zt = np_standardize(zs), np_standardize(zt)
    ref = tau**2 * np.mean([np_kl(np_softmax(Zt[n] / tau), np_softmax(Zs[n] / tau)) for n in range(6)])
    np.testing.assert_allclose(lm.ls_kd(zs, zt, temperature=tau), ref, rtol=1e-5)


# ----- DIST -----

def test_dist_matches_official_formula():
    zs, zt = rand_logits(10, (6, 5)), rand_logits(11, (6, 5))
    np.testing.assert_allclose(
        lm.dist(zs, zt, beta=2.0, gamma=2.0, temperature=4.0), np_dist(zs, zt, 2.0, 2.0, 4.0), rtol=1e-5
    )


def test_dist_mask_drops_rows_from_inter_and_intra_statistics():
    zs, zt = rand_logits(12, (6, 5)), rand_logits(13, (6, 5))
    mask = np.array([1, 0, 1, 1, 0, 1], bool)
    zs_garbage = zs.copy()
    zs_garbage[~mask] = 1e4  # padding: anything there must not matter
    expected = np_dist(zs[mask], zt[mask], 1.0, 1.5, 2.0)
    value = lm.dist(zs_garbage, zt, beta=1.0, gamma=1.5, temperature=2.0, mask=mask)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    _, intra = lm.dist_terms(zs_garbage, zt, temperature=2.0, mask=mask)
    ys, yt = np_softmax(zs[mask] / 2), np_softmax(zt[mask] / 2)
    np.testing.assert_allclose(intra, 1 - np.mean([np_pearson(ys[:, c], yt[:, c]) for c in range(5)]), rtol=1e-5)
    g = jax.jit(jax.grad(lambda s: lm.dist(s, zt, mask=mask)))(jnp.asarray(zs_garbage))
    assert np.all(np.asarray(g)[~mask] == 0)
    # An all -inf (padding) example counts as masked.
    zs_pad, zt_pad = zs.copy(), zt.copy()
    zs_pad[~mask], zt_pad[~mask] = -np.inf, -np.inf
    np.testing.assert_allclose(lm.dist(zs_pad, zt_pad, beta=1.0, gamma=1.5, temperature=2.0), expected, rtol=1e-5)


# ----- NKD -----

def test_nkd_matches_official_code():
    zs, zt = rand_logits(14, (6, 5)), rand_logits(15, (6, 5))
    y = np.array([4, 0, 3, 3, 2, 1], np.int32)
    target_ref, nontarget_ref = np_nkd(zs, zt, y, 3.0, 3.5)
    target, nontarget = lm.nkd_terms(zs, zt, y, temperature=3.0, gamma=3.5)
    np.testing.assert_allclose(target, target_ref, rtol=1e-5)
    np.testing.assert_allclose(nontarget, nontarget_ref, rtol=1e-5)
    np.testing.assert_allclose(lm.nkd(zs, zt, y, temperature=3.0, gamma=3.5), target_ref + nontarget_ref, rtol=1e-5)


def test_nkd_ce_and_kl_forms_have_the_same_student_gradient():
    zs, zt = rand_logits(16, (6, 5)), rand_logits(17, (6, 5))
    y = np.array([0, 1, 2, 3, 4, 0], np.int32)
    grad = lambda form: jax.grad(lambda s: lm.nkd(s, zt, y, temperature=2.0, gamma=1.5, form=form))(jnp.asarray(zs))
    np.testing.assert_allclose(grad("ce"), grad("kl"), atol=1e-6)
    # The values differ by γλ²·H(T̂) (a constant in the student).
    h = np.mean([np_entropy(np_softmax(np.delete(zt[n], y[n]) / 2.0)) for n in range(6)])
    diff = lm.nkd(zs, zt, y, temperature=2.0, form="ce") - lm.nkd(zs, zt, y, temperature=2.0, form="kl")
    np.testing.assert_allclose(diff, 1.5 * 4.0 * h, rtol=1e-4)


# ----- PLD -----

def test_pld_matches_numpy_loops():
    zs, zt = rand_logits(18, (6, 5)), rand_logits(19, (6, 5))
    zt[2, 4] = zt[2, 1]  # a tie, broken by class index
    y = np.array([0, 4, 2, 3, 3, 1], np.int32)
    for tau in (1.0, 4.0):
        ref = np.mean([np_pld_example(zs[n], zt[n], y[n], tau) for n in range(6)])
        np.testing.assert_allclose(lm.pld(zs, zt, y, teacher_temperature=tau), ref, rtol=1e-5)


def test_pld_is_lowest_when_the_student_ranks_like_the_teacher_optimal_permutation():
    rng = np.random.default_rng(20)
    C = 6
    zt = rng.normal(size=(1, C)).astype(np.float32) * 2
    y = np.array([int(np.argmin(zt))])  # label differs from the teacher's top class
    perm = [y[0]] + sorted((c for c in range(C) if c != y[0]), key=lambda c: -zt[0, c])
    values = np.linspace(5.0, -5.0, C).astype(np.float32)
    aligned = np.zeros((1, C), np.float32)
    aligned[0, perm] = values
    best = float(lm.pld(aligned, zt, y))
    for _ in range(20):
        shuffled = np.zeros((1, C), np.float32)
        shuffled[0, perm] = rng.permutation(values)
        assert float(lm.pld(shuffled, zt, y)) >= best - 1e-6
    # Spreading the aligned logits drives the loss to 0 (every PL choice becomes certain).
    assert float(lm.pld(aligned * 20, zt, y)) < 1e-6 < best


# ----- SinKD -----

def test_sinkhorn_matches_plain_official_sinkhorn_times_batch_size():
    zs, zt = rand_logits(21, (6, 5), 2.0), rand_logits(22, (6, 5), 2.0)
    ref, _ = np_sinkhorn_official(zs, zt, 2.0, 0.1, 20)
    ours = lm.sinkhorn_distance(zs, zt, temperature=2.0, epsilon=0.1, iterations=20)
    np.testing.assert_allclose(6 * float(ours), ref, rtol=1e-4)


def test_sinkhorn_plan_marginals_are_uniform_and_masked_rows_get_no_mass():
    zs, zt = rand_logits(23, (6, 5), 2.0), rand_logits(24, (6, 5), 2.0)
    plan, cost = lm.sinkhorn_plan(zs, zt, epsilon=0.5, iterations=200)
    np.testing.assert_allclose(np.sum(plan, 1), np.full(6, 1 / 6), atol=1e-5)
    np.testing.assert_allclose(np.sum(plan, 0), np.full(6, 1 / 6), atol=1e-5)
    mask = np.array([1, 1, 0, 1, 0, 1], bool)
    plan, _ = lm.sinkhorn_plan(zs, zt, epsilon=0.5, iterations=200, mask=mask)
    plan = np.asarray(plan)
    assert np.all(plan[~mask] == 0) and np.all(plan[:, ~mask] == 0)
    np.testing.assert_allclose(plan.sum(1)[mask], np.full(4, 1 / 4), atol=1e-5)
    np.testing.assert_allclose(plan.sum(0)[mask], np.full(4, 1 / 4), atol=1e-5)
    # Masked examples are simply absent: same value as the Sinkhorn distance over the unmasked ones.
    ref, _ = np_sinkhorn_official(zs[mask], zt[mask], 2.0, 0.1, 20)
    np.testing.assert_allclose(4 * float(lm.sinkhorn_distance(zs, zt, mask=mask)), ref, rtol=1e-4)


def np_sinkhorn_log(zs, zt, T, eps, iters):
    """Log-domain Sinkhorn in float64 with uniform 1/B marginals (an independent reference for small ε)."""
    ps, pt = np_softmax(zs / T), np_softmax(zt / T)
    B = ps.shape[0]
    W = np.array([[np.abs(ps[i] - pt[j]).sum() for j in range(B)] for i in range(B)])
    lse = lambda x, axis: x.max(axis) + np.log(np.exp(x - x.max(axis, keepdims=True)).sum(axis))
    f, g, log_m = np.zeros(B), np.zeros(B), np.log(np.full(B, 1.0 / B))
    for _ in range(iters):
        f = log_m - lse(-W / eps + g[None, :], 1)
        g = log_m - lse(-W / eps + f[:, None], 0)
    return float((np.exp(-W / eps + f[:, None] + g[None, :]) * W).sum())


def test_sinkhorn_log_domain_is_finite_for_tiny_epsilon():
    zs, zt = rand_logits(25, (6, 5), 4.0), rand_logits(26, (6, 5), 4.0)
    f = lambda s: lm.sinkhorn_distance(s, zt, epsilon=1e-3, iterations=50)
    value, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(zs))
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(value, np_sinkhorn_log(zs, zt, 2.0, 1e-3, 50), rtol=1e-3)
    # The plain float32 iteration breaks down here: exp(−W/ε) underflows to 0 and rows normalize 0/0.
    with np.errstate(all="ignore"):
        K = np.exp(-np.asarray(lm.sinkhorn_plan(zs, zt, epsilon=1e-3)[1], np.float32) / np.float32(1e-3))
        plain = K / K.sum(1, keepdims=True)
    assert not np.all(np.isfinite(plain))


# ----- BD-KD -----

def test_bdkd_matches_numpy_and_weights_follow_relative_entropies():
    zs, zt = rand_logits(27, (6, 5)), rand_logits(28, (6, 5))
    np.testing.assert_allclose(lm.bdkd(zs, zt, temperature=3.0), np_bdkd(zs, zt, 3.0), rtol=1e-5)
    w_f, w_r = lm.bdkd_weights(zs, zt, temperature=3.0)
    np.testing.assert_allclose(np.asarray(w_f) + np.asarray(w_r), 1.0, rtol=1e-6)
    # A confident (low-entropy) student gets more forward (mass-covering) KL.
    sharp, flat = np.array([[8.0, 0.0, 0.0]], np.float32), np.array([[0.5, 0.0, 0.0]], np.float32)
    assert float(lm.bdkd_weights(sharp, flat)[0][0]) > 0.5 > float(lm.bdkd_weights(flat, sharp)[0][0])
    forward, reverse = lm.bdkd_terms(zs, zt, temperature=3.0)
    np.testing.assert_allclose(forward + reverse, lm.bdkd(zs, zt, temperature=3.0), rtol=1e-6)


# ----- Swing -----

def test_swing_without_noise_and_constant_temperature_is_kd():
    zs, zt = rand_logits(29, (6, 5)), rand_logits(30, (6, 5))
    out = lm.swing_kd(zs, zt, jax.random.PRNGKey(0), base_temperature=3.0, noise_scale=0.0)
    np.testing.assert_allclose(out, losses.kd(zs, zt, temperature=3.0), rtol=1e-6)


def test_swing_matches_numpy_with_per_example_temperature_and_noise():
    zs, zt = rand_logits(31, (6, 5)), rand_logits(32, (6, 5))
    r = np.array([0.0, 0.25, 1.0, 0.5, 0.75, 0.1], np.float32)
    key = jax.random.PRNGKey(3)
    xi = np.asarray(jax.random.normal(key, (6, 5), jnp.float32), np.float64)
    T = 2.0 + (6.0 - 2.0) * r
    ref = np.mean([
        T[n] ** 2 * np_kl(np_softmax(zt[n] / T[n] + 0.3 * xi[n]), np_softmax(zs[n] / T[n])) for n in range(6)
    ])
    out = lm.swing_kd(zs, zt, key, base_temperature=2.0, max_temperature=6.0, privacy_scores=r, noise_scale=0.3)
    np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_swing_randomness_comes_only_from_rng():
    zs, zt = rand_logits(33, (6, 5)), rand_logits(34, (6, 5))
    f = jax.jit(lambda s, t, k: lm.swing_kd(s, t, k, noise_scale=0.5, noise="laplace"))
    a, b = f(zs, zt, jax.random.PRNGKey(7)), f(zs, zt, jax.random.PRNGKey(7))
    c = f(zs, zt, jax.random.PRNGKey(8))
    assert float(a) == float(b) and float(a) != float(c)


# ----- BinaryKL-Norm -----

def test_binary_kl_norm_matches_official_and_stays_finite_past_the_float32_clamp():
    zs, zt = rand_logits(35, (6, 5)), rand_logits(36, (6, 5))
    np.testing.assert_allclose(lm.binary_kl_norm(zs, zt, temperature=2.0), np_binary_kl_norm(zs, zt, 2.0), rtol=1e-5)
    far = np.array([[100.0, -100.0]], np.float32)
    value, grad = jax.value_and_grad(lambda s: lm.binary_kl_norm(s, np.zeros((1, 2), np.float32)))(jnp.asarray(far))
    np.testing.assert_allclose(value, np_binary_kl_norm(far, np.zeros((1, 2)), 2.0), rtol=1e-5)
    assert np.all(np.isfinite(grad))


# ----- properties (hypothesis; jitted once) -----

logits3x6 = hnp.arrays(
    np.float32, (3, 6), elements=st.floats(-10, 10, width=32, allow_nan=False, allow_subnormal=False)
)
labels3 = hnp.arrays(np.int32, (3,), elements=st.integers(0, 5))

_dkd_j = jax.jit(lambda s, t, y: lm.dkd_terms(s, t, y, temperature=2.0, reduction="none"))
_ls_j = jax.jit(lambda s, t: lm.ls_kd(s, t, temperature=2.0))
_dist_j = jax.jit(lambda s, t: lm.dist(s, t, temperature=2.0))
_nkd_kl_j = jax.jit(lambda s, t, y: lm.nkd_terms(s, t, y, temperature=2.0, form="kl", reduction="none")[1])
_pld_j = jax.jit(lambda s, t, y: lm.pld(s, t, y, reduction="none"))
_sink_j = jax.jit(lambda s, t: lm.sinkhorn_distance(s, t, epsilon=0.1))
_bdkd_j = jax.jit(lambda s, t: lm.bdkd(s, t, temperature=2.0, reduction="none"))
_bkl_j = jax.jit(lambda s, t: lm.binary_kl_norm(s, t, reduction="none"))


@settings(max_examples=25, deadline=None)
@given(zs=logits3x6, zt=logits3x6, y=labels3, shift=st.floats(-30, 30))
def test_nonnegative_and_shift_invariant(zs, zt, y, shift):
    sh = np.float32(shift)
    cases = [
        (lambda s, t: np.stack(_dkd_j(s, t, y)), True),
        (lambda s, t: _ls_j(s, t), True),
        (lambda s, t: _dist_j(s, t), True),
        (lambda s, t: _nkd_kl_j(s, t, y), True),
        (lambda s, t: _sink_j(s, t), True),
        (lambda s, t: _bdkd_j(s, t), True),
        (lambda s, t: _bkl_j(s, t), False),  # per-class logit matching: shifting both keeps it
    ]
    for f, softmax_based in cases:
        value = np.asarray(f(zs, zt))
        assert np.all(value >= -1e-4), value
        shifted = f(zs + sh, zt - sh) if softmax_based else f(zs + sh, zt + sh)
        np.testing.assert_allclose(np.asarray(shifted), value, atol=2e-3, rtol=2e-3)
    # PLD ranks by the teacher's logits, which a shift can re-tie by rounding: shift the student only.
    value = np.asarray(_pld_j(zs, zt, y))
    assert np.all(value >= -1e-4)
    np.testing.assert_allclose(np.asarray(_pld_j(zs + sh, zt, y)), value, atol=2e-3, rtol=2e-3)


@settings(max_examples=25, deadline=None)
@given(z=logits3x6, y=labels3)
def test_zero_when_student_equals_teacher(z, y):
    assert np.all(np.abs(np.stack(_dkd_j(z, z + 1.0, y))) < 1e-4)
    assert abs(float(_ls_j(z, z))) < 1e-4
    assert np.all(np.abs(np.asarray(_nkd_kl_j(z, z, y))) < 1e-4)
    assert np.all(np.abs(np.asarray(_bdkd_j(z, z))) < 1e-4)
    assert np.all(np.abs(np.asarray(_bkl_j(z, z))) < 1e-5)
    # DIST: ρ(u, u) = ‖ū‖²/(‖ū‖² + eps), so 1 − ρ is small only when every row and column of the
    # probabilities varies well above eps (a constant one has ρ = 0, as in the official code).
    p = np_softmax(z / 2.0)
    spread = min(((p - p.mean(1, keepdims=True)) ** 2).sum(1).min(), ((p - p.mean(0)) ** 2).sum(0).min())
    if spread > 1e-4:
        assert float(_dist_j(z, z)) < 1e-3


@settings(max_examples=25, deadline=None)
@given(z=logits3x6, zt=logits3x6, scale=st.floats(0.2, 5.0), shift=st.floats(-10, 10))
def test_ls_kd_is_scale_and_shift_invariant(z, zt, scale, shift):
    # Standardization removes each row's mean and std: LS-KD ignores a positive affine map of either side
    # (up to eps, negligible unless a row is almost constant).
    if np.min(np.std(z, -1)) < 1e-2 or np.min(np.std(zt, -1)) < 1e-2:
        return
    base = float(_ls_j(z, zt))
    moved = float(_ls_j(np.float32(scale) * z + np.float32(shift), zt / np.float32(scale)))
    np.testing.assert_allclose(moved, base, atol=1e-3, rtol=1e-3)


# ----- gradients, jit, bfloat16, masked vocabulary, masked batch -----
# One jitted forward and one jitted value-and-grad per loss, shared by the tests below (same shapes), so
# each loss compiles a handful of times instead of once per op per test.

_KEY = jax.random.PRNGKey(0)
_LOSSES = {
    "dkd": lambda s, t, y, m: lm.dkd(s, t, y, temperature=2.0, mask=m),
    "ls_kd": lambda s, t, y, m: lm.ls_kd(s, t, mask=m),
    "dist": lambda s, t, y, m: lm.dist(s, t, temperature=2.0, mask=m),
    "nkd": lambda s, t, y, m: lm.nkd(s, t, y, temperature=2.0, mask=m),
    "pld": lambda s, t, y, m: lm.pld(s, t, y, mask=m),
    "sinkhorn": lambda s, t, y, m: lm.sinkhorn_distance(s, t, epsilon=0.5, iterations=10, mask=m),
    "bdkd": lambda s, t, y, m: lm.bdkd(s, t, temperature=2.0, mask=m),
    "swing": lambda s, t, y, m: lm.swing_kd(s, t, _KEY, noise_scale=0.2, mask=m),
    "binary_kl_norm": lambda s, t, y, m: lm.binary_kl_norm(s, t, mask=m),
}
_VG = {name: jax.jit(jax.value_and_grad(f)) for name, f in _LOSSES.items()}
Y = np.array([0, 4, 2], np.int32)
ONES = np.ones(3, np.float32)


def test_gradients_match_finite_differences():
    from jax.test_util import check_vjp

    zs = jnp.asarray(rand_logits(40, (3, 6), 1.0))
    zt = jnp.asarray(rand_logits(41, (3, 6), 1.0))
    for name in _LOSSES:
        f = lambda s, name=name: _VG[name](s, zt, Y, ONES)[0]

        def f_vjp(s, name=name):
            value, grad = _VG[name](s, zt, Y, ONES)
            return value, lambda ct: (ct * grad,)

        try:
            check_vjp(f, f_vjp, (zs,), atol=2e-2, rtol=2e-2)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def test_jit_and_bfloat16_inputs_compute_in_float32():
    zs, zt = rand_logits(42, (3, 6)), rand_logits(43, (3, 6))
    s16, t16 = jnp.asarray(zs, jnp.bfloat16), jnp.asarray(zt, jnp.bfloat16)
    s32, t32 = (np.asarray(x, np.float32) for x in (s16, t16))
    for name, f in _LOSSES.items():
        out = jax.jit(f)(s16, t16, Y, ONES)
        assert out.dtype == jnp.float32, name
        np.testing.assert_allclose(out, _VG[name](s32, t32, Y, ONES)[0], rtol=1e-5, atol=1e-6, err_msg=name)


def test_neg_inf_logits_give_finite_loss_and_grads():
    zs, zt = rand_logits(44, (3, 6)), rand_logits(45, (3, 6))
    zs[:, -2:] = -np.inf  # masked vocabulary on both sides
    zt[:, -2:] = -np.inf
    zt[0, 1] = -np.inf    # the teacher alone excludes a class
    y = np.array([0, 2, 3], np.int32)
    for name, vg in _VG.items():
        value, grad = vg(jnp.asarray(zs), zt, y, ONES)
        assert np.isfinite(value), name
        assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[:, -2:] == 0), name
    # Classes excluded on both sides behave as if the vocabulary were smaller.
    zt[0, 1] = 0.3
    for name in ("dkd", "pld", "ls_kd", "dist", "binary_kl_norm"):
        full = _VG[name](jnp.asarray(zs), zt, y, ONES)[0]
        small = _LOSSES[name](zs[:, :-2], zt[:, :-2], y, ONES)
        np.testing.assert_allclose(full, small, rtol=1e-5, err_msg=name)


def test_all_masked_batch_gives_zero_and_zero_grads():
    zs, zt = rand_logits(46, (3, 6)), rand_logits(47, (3, 6))
    for name, vg in _VG.items():
        value, grad = vg(jnp.asarray(zs), zt, Y, np.zeros(3, np.float32))
        assert float(value) == 0.0, name
        assert np.all(np.asarray(grad) == 0), name


def test_sequence_shaped_logits_and_token_mask():
    zs, zt = rand_logits(48, (2, 3, 5)), rand_logits(49, (2, 3, 5))
    y = np.array([[0, 1, 2], [3, 4, 0]])
    mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
    flat = lambda a: a.reshape(6, *a.shape[2:])
    for f in (lambda s, t, y, m: lm.dkd(s, t, y, mask=m), lambda s, t, y, m: lm.dist(s, t, mask=m)):
        np.testing.assert_allclose(f(zs, zt, y, mask), f(flat(zs), flat(zt), flat(y), flat(mask)), rtol=1e-5)


# ----- bad input -----

def test_nonpositive_temperature_raises():
    z = np.zeros((2, 3), np.float32)
    y = np.array([0, 1])
    key = jax.random.PRNGKey(0)
    calls = {
        "temperature": [
            lambda T: lm.dkd(z, z, y, temperature=T), lambda T: lm.ls_kd(z, z, temperature=T),
            lambda T: lm.dist(z, z, temperature=T), lambda T: lm.nkd(z, z, y, temperature=T),
            lambda T: lm.sinkhorn_distance(z, z, temperature=T), lambda T: lm.bdkd(z, z, temperature=T),
            lambda T: lm.binary_kl_norm(z, z, temperature=T),
        ],
        "teacher_temperature": [lambda T: lm.pld(z, z, y, teacher_temperature=T)],
        "base_temperature": [lambda T: lm.swing_kd(z, z, key, base_temperature=T)],
    }
    for name, fns in calls.items():
        for fn in fns:
            for T in (0.0, -1.0):
                with pytest.raises(ValueError, match=name):
                    fn(T)


def test_hyperparameters_out_of_range_raise():
    z = np.zeros((2, 3), np.float32)
    y = np.array([0, 1])
    key = jax.random.PRNGKey(0)
    cases = [
        ("alpha", lambda: lm.dkd(z, z, y, alpha=-1.0)),
        ("beta", lambda: lm.dkd(z, z, y, beta=-0.5)),
        ("beta", lambda: lm.dist(z, z, beta=-1.0)),
        ("gamma", lambda: lm.dist(z, z, gamma=-1.0)),
        ("gamma", lambda: lm.nkd(z, z, y, gamma=-1.0)),
        ("form", lambda: lm.nkd(z, z, y, form="js")),
        ("epsilon", lambda: lm.sinkhorn_distance(z, z, epsilon=0.0)),
        ("iterations", lambda: lm.sinkhorn_distance(z, z, iterations=0)),
        ("iterations", lambda: lm.sinkhorn_distance(z, z, iterations=2.5)),
        ("reduction='mean'", lambda: lm.sinkhorn_distance(z, z, reduction="sum")),
        ("reduction='mean'", lambda: lm.dist(z, z, reduction="none")),
        ("eps", lambda: lm.standardize_logits(z, eps=0.0)),
        ("eps", lambda: lm.binary_kl_norm(z, z, eps=0.7)),
        ("noise_scale", lambda: lm.swing_kd(z, z, key, noise_scale=-0.1)),
        ("noise", lambda: lm.swing_kd(z, z, key, noise="uniform")),
        ("privacy_scores", lambda: lm.swing_kd(z, z, key, privacy_scores=np.array([0.5, 1.5]))),
        ("privacy_scores", lambda: lm.swing_kd(z, z, key, privacy_scores=np.zeros(3))),
        ("max_temperature", lambda: lm.swing_kd(z, z, key, max_temperature=-2.0)),
    ]
    for message, fn in cases:
        with pytest.raises(ValueError, match=message):
            fn()


def test_mismatched_shapes_vocab_and_labels_raise():
    a, b, c = np.zeros((2, 3)), np.zeros((2, 4)), np.zeros((3, 3))
    y = np.array([0, 1])
    key = jax.random.PRNGKey(0)
    two_arg = [lm.ls_kd, lm.dist, lm.sinkhorn_distance, lm.bdkd, lm.binary_kl_norm,
               lambda s, t: lm.swing_kd(s, t, key)]
    three_arg = [lm.dkd, lm.nkd, lm.pld]
    for fn in two_arg:
        with pytest.raises(ValueError, match="number of classes"):
            fn(a, b)
        with pytest.raises(ValueError, match="same shape"):
            fn(a, c)
    for fn in three_arg:
        with pytest.raises(ValueError, match="number of classes"):
            fn(a, b, y)
        with pytest.raises(ValueError, match="outside"):
            fn(a, a, np.array([0, 3]))
        with pytest.raises(ValueError, match="outside"):
            fn(a, a, np.array([-1, 0]))
        with pytest.raises(ValueError, match="labels must have shape"):
            fn(a, a, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="mask must have shape"):
        lm.dist(a, a, mask=np.ones(3, bool))


# ----- method transforms -----

def fake_inputs(seed=0, step=0, mask=None):
    zs, zt = rand_logits(seed, (6, 5)), rand_logits(seed + 1, (6, 5))
    batch = {"label": np.array([0, 1, 2, 3, 4, 0], np.int32)}
    if mask is not None:
        batch["mask"] = mask
    return LossInputs(
        student=Outputs(jnp.asarray(zs), {}, {}), teacher=Outputs(jnp.asarray(zt), {}, {}),
        batch=batch, step=jnp.asarray(step, jnp.int32),
    )


def run(method, inputs, seed=1):
    vars = method.init(jax.random.PRNGKey(0), inputs)
    return method.loss(vars, inputs, jax.random.PRNGKey(seed))


ALL_METHODS = [
    mm.dkd(alpha=1.0, beta=8.0, temperature=4.0), mm.kd_ls(temperature=2.0), mm.dist(temperature=4.0),
    mm.nkd(temperature=1.0, gamma=1.5), mm.pld(teacher_temperature=1.0), mm.sinkd(), mm.bdkd(), mm.swing(),
]


def test_methods_match_their_losses_and_report_metrics():
    inputs = fake_inputs(mask=np.array([1, 1, 1, 0, 1, 1], bool))
    zs, zt, y, mask = inputs.student.logits, inputs.teacher.logits, inputs.batch["label"], inputs.batch["mask"]
    total, aux = run(chain(*ALL_METHODS), inputs)
    expected = {
        "dkd": lm.dkd(zs, zt, y, alpha=1.0, beta=8.0, temperature=4.0, mask=mask),
        "kd_ls": lm.ls_kd(zs, zt, temperature=2.0, mask=mask),
        "dist": lm.dist(zs, zt, temperature=4.0, mask=mask),
        "nkd": lm.nkd(zs, zt, y, mask=mask),
        "pld": lm.pld(zs, zt, y, mask=mask),
        "sinkd": lm.sinkhorn_distance(zs, zt, mask=mask),
        "bdkd": lm.bdkd(zs, zt, mask=mask),
    }
    for name, value in expected.items():
        np.testing.assert_allclose(aux.metrics[name], value, rtol=1e-5, err_msg=name)
    for key in ("dkd/tckd", "dkd/nckd", "dist/inter", "dist/intra", "nkd/target", "nkd/nontarget",
                "bdkd/forward", "bdkd/reverse", "bdkd/w_forward", "swing"):
        assert np.isfinite(aux.metrics[key]), key
    np.testing.assert_allclose(aux.metrics["dkd"], aux.metrics["dkd/tckd"] + 8 * aux.metrics["dkd/nckd"], rtol=1e-5)


def test_methods_detach_the_teacher():
    inputs = fake_inputs()
    method = chain(*ALL_METHODS)
    vars = method.init(jax.random.PRNGKey(0), inputs)

    def total(zs, zt):
        new = inputs.replace(student=Outputs(zs, {}, {}), teacher=Outputs(zt, {}, {}))
        return method.loss(vars, new, jax.random.PRNGKey(1))[0]

    # Jitted, the teacher-only gradient compiles in a blink: the loss itself is dead code once detached.
    gt = jax.jit(jax.grad(total, argnums=1))(inputs.student.logits, inputs.teacher.logits)
    assert np.all(np.asarray(gt) == 0)


def test_dkd_warmup_weight_mirrors_one_indexed_epochs():
    method = chain(mm.dkd(warmup_steps=20, weight=2.0))
    for step, w in [(0, 2.0 / 20), (9, 2.0 * 10 / 20), (19, 2.0), (100, 2.0)]:
        total, aux = run(method, fake_inputs(step=step))
        np.testing.assert_allclose(aux.metrics["dkd/weight"], w, rtol=1e-6)
        np.testing.assert_allclose(total, w * aux.metrics["dkd"], rtol=1e-5)
    assert mm.dkd().weight == 1.0
    with pytest.raises(ValueError, match="warmup_steps"):
        mm.dkd(warmup_steps=-1)


def test_swing_method_uses_the_step_rng_and_privacy_scores():
    inputs = fake_inputs()
    method = chain(mm.swing(noise_scale=0.5))
    assert float(run(method, inputs, seed=1)[0]) == float(run(method, inputs, seed=1)[0])
    assert float(run(method, inputs, seed=1)[0]) != float(run(method, inputs, seed=2)[0])
    scored = chain(mm.swing(noise_scale=0.0, max_temperature=8.0, privacy_key="privacy"))
    assert scored.batch_keys == ("privacy",)
    with pytest.raises(ValueError, match="privacy"):
        run(scored, inputs)
    inputs = inputs.replace(batch={**inputs.batch, "privacy": np.linspace(0, 1, 6).astype(np.float32)})
    assert np.isfinite(float(run(scored, inputs)[0]))


def test_kd_ls_without_standardization_is_kd():
    inputs = fake_inputs()
    value = run(chain(mm.kd_ls(temperature=3.0, standardize=False)), inputs)[0]
    expected = losses.kd(inputs.student.logits, inputs.teacher.logits, temperature=3.0)
    np.testing.assert_allclose(value, expected, rtol=1e-6)


def test_method_factories_check_arguments_and_declare_batch_keys():
    for bad in (
        lambda: mm.dkd(temperature=0.0), lambda: mm.dkd(beta=-1.0), lambda: mm.dist(gamma=-1.0),
        lambda: mm.nkd(form="x"), lambda: mm.pld(teacher_temperature=-1.0), lambda: mm.sinkd(iterations=0),
        lambda: mm.bdkd(temperature=-2.0), lambda: mm.swing(noise_scale=-1.0), lambda: mm.kd_ls(temperature=0.0),
    ):
        with pytest.raises(ValueError):
            bad()
    assert mm.dkd().batch_keys == ("label",) and mm.nkd().batch_keys == ("label",) and mm.pld().batch_keys == ("label",)
    assert all(m.needs_teacher for m in ALL_METHODS)
    with pytest.raises(ValueError, match="needs batch\\['label'\\]"):
        run(chain(mm.pld()), fake_inputs().replace(batch={}))


def test_train_step_with_dkd_warmup():
    teacher, student = tiny_models()
    batch = tiny_batch()
    state = jaxkd.create(
        student=student, teacher=teacher, teacher_variables=teacher_variables(teacher, batch),
        method=jaxkd.methods.ce() + mm.dkd(warmup_steps=5),
        tx=optax.sgd(0.05), sample_batch=batch, rng=jax.random.PRNGKey(0),
    )
    step = jaxkd.make_train_step()
    first = None
    for _ in range(8):
        state, metrics = step(state, batch)
        first = float(metrics["loss"]) if first is None else first
    assert all(np.isfinite(float(v)) for v in metrics.values())
    np.testing.assert_allclose(metrics["dkd/weight"], 1.0)
