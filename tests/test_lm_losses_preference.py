"""Sequence log-probabilities and preference-distillation losses: DPO and LLaVA-MoD's kto_pair
(jaxkd/losses/lm/dpo.py), DCKD and ADPA (jaxkd/losses/lm/adpa.py), MGSR's clipped KL and span loss
(jaxkd/losses/lm/dac_kl.py).

Values against NumPy written from the formulas, and against NumPy transcriptions of the official code's
computation where it has its own conventions (TRL/LLaVA-MoD ``dpo_loss`` and ``kto_pair``; ADPA's
top-k compression, clamping and ``get_reverse_ce`` / ``get_kl_loss``); gradients against float64 central
finite differences; masks; all-masked inputs; argument errors.
"""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxkd import losses
from tests.numpy_reference import np_log_softmax
from tests.test_loss_contract import central_differences


B, T, V = 3, 5, 7
MASK = np.array([[1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], bool)


def logits(seed, shape=(B, T, V), scale=1.5, dtype=np.float32):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(dtype)


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ----- sequence log-probabilities -----


def test_token_and_sequence_log_probs():
    z = logits(0)
    y = np.random.default_rng(1).integers(0, V, size=(B, T)).astype(np.int32)
    lp = np.take_along_axis(np_log_softmax(z), y[..., None], -1)[..., 0]
    np.testing.assert_allclose(losses.token_log_probs(z, y), lp, rtol=1e-6)
    np.testing.assert_allclose(losses.token_log_probs(z, y, MASK), np.where(MASK, lp, 0), rtol=1e-6)
    np.testing.assert_allclose(losses.sequence_log_probs(z, y, MASK), np.where(MASK, lp, 0).sum(1), rtol=1e-6)
    np.testing.assert_allclose(losses.sequence_log_probs(z, y, MASK, average=True),
                               np.where(MASK, lp, 0).sum(1) / MASK.sum(1), rtol=1e-6)
    # Masked targets may be anything (padding, -100): no error, no effect.
    y2 = np.where(MASK, y, -100)
    np.testing.assert_allclose(losses.sequence_log_probs(z, y2, MASK), np.where(MASK, lp, 0).sum(1), rtol=1e-6)
    none = np.zeros((B, T), bool)
    np.testing.assert_allclose(losses.sequence_log_probs(z, y, none, average=True), np.zeros(B))
    # Out of range inside jit (not checkable): NaN, never a silent wrong value.
    bad = jax.jit(lambda a, b: losses.token_log_probs(a, b))(z, y + V)
    assert np.all(np.isnan(np.asarray(bad)))


# ----- DPO -----


def np_dpo(pc, pr, rc, rr, beta, eps):
    h = (pc - rc) - (pr - rr)
    return -(1 - eps) * np_log_sigmoid(beta * h) - eps * np_log_sigmoid(-beta * h)


def pairs(seed, n=B):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=n) * 3 - 20).astype(np.float32) for _ in range(4)]


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2), (2.0, 0.5)])
def test_dpo_loss_matches_the_formula(beta, eps):
    pc, pr, rc, rr = pairs(2)
    got = losses.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps, reduction="none")
    np.testing.assert_allclose(got, np_dpo(pc, pr, rc, rr, beta, eps), rtol=1e-5)
    w = np.array([True, False, True])
    np.testing.assert_allclose(losses.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps, mask=w),
                               np_dpo(pc, pr, rc, rr, beta, eps)[w].mean(), rtol=1e-5)
    chosen, rejected = losses.dpo_rewards(pc, pr, rc, rr, beta=beta)
    np.testing.assert_allclose(chosen, beta * (pc - rc), rtol=1e-5)
    np.testing.assert_allclose(rejected, beta * (pr - rr), rtol=1e-5)


@settings(deadline=None, max_examples=15, derandomize=True)
@given(st.floats(-30, 30), st.floats(-30, 30), st.floats(0.0, 0.5))
def test_dpo_depends_on_the_margin_only(shift_chosen, shift_rejected, eps):
    # Adding c to a response's policy and reference log-probabilities leaves its log-ratio unchanged.
    pc, pr, rc, rr = pairs(3)
    a = _dpo(pc, pr, rc, rr, eps)
    b = _dpo(pc + shift_chosen, pr + shift_rejected, rc + shift_chosen, rr + shift_rejected, eps)
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)


_dpo = jax.jit(lambda pc, pr, rc, rr, eps: losses.dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=eps, reduction="none"))


def test_dpo_gradient_closed_form_and_detached_reference():
    pc, pr, rc, rr = pairs(4)
    beta, eps = 0.5, 0.1
    g = jax.grad(lambda a, b, c, d: losses.dpo_loss(a, b, c, d, beta=beta, label_smoothing=eps), argnums=(0, 1, 2, 3))
    gpc, gpr, grc, grr = g(pc, pr, rc, rr)
    z = beta * ((pc - rc) - (pr - rr))
    d = (-beta * (1 - eps) * np_sigmoid(-z) + beta * eps * np_sigmoid(z)) / B
    np.testing.assert_allclose(gpc, d, rtol=1e-5)
    np.testing.assert_allclose(gpr, -d, rtol=1e-5)
    assert np.all(np.asarray(grc) == 0) and np.all(np.asarray(grr) == 0)


def test_dpo_through_sequence_log_probs_matches_finite_differences():
    """Preference distillation end to end: student logits → summed response log-probs → DPO with the
    teacher's (constant) log-probs as reference; the gradient with respect to the student's logits."""
    with jax.enable_x64(True):
        student = logits(5, (2, B, T, V), dtype=np.float64)  # [chosen, rejected]
        teacher = logits(6, (2, B, T, V), dtype=np.float64)
        y = np.random.default_rng(7).integers(0, V, size=(2, B, T)).astype(np.int32)
        ref_c = losses.sequence_log_probs(teacher[0], y[0], MASK)
        ref_r = losses.sequence_log_probs(teacher[1], y[1], MASK)

        def f(z):
            pc = losses.sequence_log_probs(z[0], y[0], MASK)
            pr = losses.sequence_log_probs(z[1], y[1], MASK)
            return losses.dpo_loss(pc, pr, ref_c, ref_r, beta=0.3, label_smoothing=0.1)

        grad = np.asarray(jax.jit(jax.grad(f))(student))
        np.testing.assert_allclose(grad, central_differences(f, student), rtol=1e-6, atol=1e-10)
        assert np.all(grad[:, ~MASK] == 0)


def np_kto_pair(pc, pr, rc, rr, beta):
    """LLaVA-MoD DPOTrainer.dpo_loss, loss_type='kto_pair', in NumPy (torch semantics)."""
    chosen_kl = max((pc - rc).mean(), 0.0)
    rejected_kl = max((pr - rr).mean(), 0.0)
    chosen_lr, rejected_lr = pc - rc, pr - rr
    all_losses = np.concatenate([1 - np_sigmoid(beta * (chosen_lr - rejected_kl)),
                                 1 - np_sigmoid(beta * (chosen_kl - rejected_lr))])
    return all_losses.mean()


def test_kto_pair_matches_the_official_computation():
    rng = np.random.default_rng(8)
    rc, rr = rng.normal(size=4) - 20, rng.normal(size=4) - 20
    for chosen_shift, rejected_shift in [(2.0, -1.0), (-1.5, 3.0)]:  # KL estimates clamped / not clamped
        pc = (rc + chosen_shift + rng.normal(scale=0.5, size=4)).astype(np.float32)
        pr = (rr + rejected_shift + rng.normal(scale=0.5, size=4)).astype(np.float32)
        args = [x.astype(np.float32) for x in (pc, pr, rc, rr)]
        np.testing.assert_allclose(losses.kto_pair_loss(*args, beta=0.1), np_kto_pair(pc, pr, rc, rr, 0.1), rtol=1e-5)
        keep = np.array([True, False, True, True])
        np.testing.assert_allclose(losses.kto_pair_loss(*args, beta=0.1, mask=keep),
                                   np_kto_pair(pc[keep], pr[keep], rc[keep], rr[keep], 0.1), rtol=1e-5)
    assert float(losses.kto_pair_loss(*args, mask=np.zeros(4, bool))) == 0.0
    with jax.enable_x64(True):
        p = np.concatenate([rc + 1.0 + rng.normal(scale=0.5, size=4), rr - 2.0 + rng.normal(scale=0.5, size=4)])
        f = lambda x: losses.kto_pair_loss(x[:4], x[4:], rc, rr, beta=0.7)
        np.testing.assert_allclose(jax.jit(jax.grad(f))(p), central_differences(f, p), rtol=1e-6, atol=1e-10)


# ----- ADPA and DCKD -----


def np_compress_probs(z, k):
    """ADPA utils/precompute_logits.py compress_probs: top-k probabilities, their indices, the rest."""
    p = np.exp(np_log_softmax(z.astype(np.float64)))
    idx = np.argsort(-p, -1)[..., :k]
    vals = np.take_along_axis(p, idx, -1)
    return idx, vals, 1 - vals.sum(-1)


def np_official_adpa(student, dpo, ref, mask, k):
    """merge_logits_adpa_dataset.get_margin_logp_token + load_input_and_target_probs_fast (prob_stabilize)
    + DistillTrainer.get_reverse_ce, per token, in NumPy."""
    q = np.exp(np_log_softmax(student.astype(np.float64)))
    ia, va, _ = np_compress_probs(dpo, k)
    ib, vb, _ = np_compress_probs(ref, k)
    total, count = 0.0, 0
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            pa, pb = dict(zip(ia[b, t], va[b, t])), dict(zip(ib[b, t], vb[b, t]))
            floor = max(min(va[b, t]), 1e-7)  # the official fills missing entries of *both* from pa's minimum
            margin = {i: np.log(max(pa[i], 1e-7) / max(pb.get(i, floor), 1e-7)) for i in ia[b, t]}
            order = sorted(margin.items(), key=lambda kv: kv[1], reverse=True)
            indices = [i for i, _ in order]
            target = np.array([v for _, v in order] + [0.0])  # no remaining_probs_sum in the margin records
            output = np.append(q[b, t, indices], 1 - q[b, t, indices].sum())
            output, target = np.clip(output, 1e-8, 1 - 1e-8), np.clip(target, 1e-8, 1 - 1e-8)
            total += (output * target).sum()
            count += 1
    return -total / count


def test_adpa_advantages_and_loss_formula():
    s, dpo, ref = logits(9), logits(10), logits(11)
    adv = np_log_softmax(dpo) - np_log_softmax(ref)
    np.testing.assert_allclose(losses.adpa_advantages(dpo, ref), adv, rtol=1e-5, atol=1e-6)
    top = np.argsort(-dpo, -1)[..., :3]
    kept = np.zeros_like(adv, bool)
    np.put_along_axis(kept, top, True, -1)
    np.testing.assert_allclose(losses.adpa_advantages(dpo, ref, top_k=3), np.where(kept, adv, 0), rtol=1e-5, atol=1e-6)
    q = np.exp(np_log_softmax(s))
    np.testing.assert_allclose(losses.adpa(s, dpo, ref, reduction="none"), -(q * adv).sum(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses.adpa(s, dpo, ref, mask=MASK), (-(q * adv).sum(-1))[MASK].mean(), rtol=1e-5)
    # An entry excluded by either teacher carries no advantage.
    dpo2 = dpo.copy()
    dpo2[..., 0] = -np.inf
    assert np.all(np.asarray(losses.adpa_advantages(dpo2, ref))[..., 0] == 0)


def test_adpa_matches_the_official_pipeline():
    """Official: the DPO teacher's top-k margins (the reference scored at the same entries), advantages
    and student probabilities clamped to [1e-8, 1 − 1e-8], the rest of the student's mass in a bucket of
    target 1e-8. The reference is the DPO teacher at another temperature, so both top-k sets coincide and
    the official floors for missing entries never apply."""
    s, dpo = logits(12), logits(13, scale=2.0)
    ref = 0.5 * dpo
    got = losses.adpa(s, dpo, ref, top_k=3, advantage_range=(1e-8, 1 - 1e-8), mask=MASK)
    np.testing.assert_allclose(got, np_official_adpa(s, dpo, ref, MASK, 3), rtol=1e-5)


def test_adpa_gradient():
    s, dpo, ref = logits(14), logits(15), logits(16)
    adv = np_log_softmax(dpo) - np_log_softmax(ref)
    q = np.exp(np_log_softmax(s))
    expected = np.where(MASK[..., None], -q * (adv - (q * adv).sum(-1, keepdims=True)), 0) / MASK.sum()
    g = jax.grad(lambda z: losses.adpa(z, dpo, ref, mask=MASK))(s)
    np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-7)
    with jax.enable_x64(True):
        s64 = s.astype(np.float64)
        f = lambda z: losses.adpa(z, dpo.astype(np.float64), ref.astype(np.float64), top_k=4, mask=MASK)
        np.testing.assert_allclose(jax.jit(jax.grad(f))(s64), central_differences(f, s64), rtol=1e-6, atol=1e-10)


def np_official_dckd_side(student, teacher, mask, k):
    """compress_probs + load_input_and_target_probs_fast + DistillTrainer.get_kl_loss for one response."""
    q = np.exp(np_log_softmax(student.astype(np.float64)))
    idx, vals, rest = np_compress_probs(teacher, k)
    out = np.concatenate([np.take_along_axis(q, idx, -1), np.zeros(q.shape[:-1] + (1,))], -1)
    out[..., k] = 1 - out[..., :k].sum(-1)
    target = np.concatenate([vals, rest[..., None]], -1)
    out, target = np.clip(out, 1e-8, 1 - 1e-8), np.clip(target, 1e-8, 1 - 1e-8)
    out = np.maximum(out, 1e-7)
    kl = (target * (np.log(target) - np.log(out))).sum(-1)
    return kl[mask].mean()


def test_dckd_matches_the_forward_kls_and_the_official_top_k():
    sc, tc, sr, tr = logits(17), logits(18), logits(19), logits(20)
    rej_mask = MASK[::-1].copy()

    def forward_kl(s, t, m):
        lt, ls = np_log_softmax(t), np_log_softmax(s)
        return (np.exp(lt) * (lt - ls)).sum(-1)[m].mean()

    got = losses.dckd_loss(sc, tc, MASK, sr, tr, rej_mask, chosen_weight=0.7, rejected_weight=0.3)
    np.testing.assert_allclose(got, 0.7 * forward_kl(sc, tc, MASK) + 0.3 * forward_kl(sr, tr, rej_mask), rtol=1e-5)
    got_k = losses.dckd_loss(sc, tc, MASK, sr, tr, rej_mask, top_k=3)
    want_k = np_official_dckd_side(sc, tc, MASK, 3) + np_official_dckd_side(sr, tr, rej_mask, 3)
    np.testing.assert_allclose(got_k, want_k, rtol=1e-5)
    none = np.zeros((B, T), bool)
    assert float(losses.dckd_loss(sc, tc, none, sr, tr, none)) == 0.0
    with jax.enable_x64(True):
        z = np.stack([sc, sr]).astype(np.float64)
        f = lambda z: losses.dckd_loss(z[0], tc.astype(np.float64), MASK, z[1], tr.astype(np.float64), rej_mask,
                                       chosen_weight=0.7, rejected_weight=0.3, top_k=3)
        np.testing.assert_allclose(jax.jit(jax.grad(f))(z), central_differences(f, z), rtol=1e-6, atol=1e-10)


def test_masked_tokens_do_not_matter():
    s, dpo, ref = logits(21), logits(22), logits(23)
    s2 = np.where(MASK[..., None], s, 50 * logits(24))
    for f in (lambda z: losses.adpa(z, dpo, ref, mask=MASK),
              lambda z: losses.dac_kl(z, dpo, lower=0.3, upper=0.9, mask=MASK)):
        v1, g1 = jax.value_and_grad(f)(s)
        v2, g2 = jax.value_and_grad(f)(s2)
        np.testing.assert_allclose(v1, v2, rtol=1e-6)
        np.testing.assert_allclose(g1, g2, rtol=1e-6, atol=1e-9)
        v0, g0 = jax.value_and_grad(lambda z: f(z) * 0 + losses.adpa(z, dpo, ref, mask=np.zeros((B, T), bool)))(s)
        assert float(v0) == 0.0 and np.all(np.asarray(g0) == 0)


# ----- DAC-KL (assumed form) and the span loss (assumed distance) -----


def np_region(t, lower, upper):
    p = np.exp(np_log_softmax(t.astype(np.float64)))
    lower, upper = np.broadcast_to(lower, p.shape[:-1]), np.broadcast_to(upper, p.shape[:-1])
    out = np.zeros(p.shape, bool)
    for i in np.ndindex(p.shape[:-1]):
        lo, hi = np.quantile(p[i], lower[i]), np.quantile(p[i], upper[i])
        out[i] = (p[i] >= lo - 1e-12) & (p[i] <= hi + 1e-12)
    return out


def np_clipped_kl(s, t, region):
    def restrict(z):
        lp = np_log_softmax(z.astype(np.float64))
        lp = np.where(region, lp, -np.inf)
        return lp - np.log(np.exp(lp).sum(-1, keepdims=True))

    ls, lt = restrict(s), restrict(t)
    with np.errstate(invalid="ignore"):  # -inf outside the region; selected away
        return np.where(region, np.exp(lt) * (lt - ls), 0).sum(-1)


def test_dac_kl_region_and_value():
    s, t = logits(25), logits(26)
    rng = np.random.default_rng(27)
    lower = rng.uniform(0, 0.5, size=(B, T)).astype(np.float32)
    upper = rng.uniform(0.6, 1.0, size=(B, T)).astype(np.float32)
    region = np_region(t, lower, upper)
    np.testing.assert_array_equal(losses.dac_kl_region(t, lower=lower, upper=upper), region)
    np.testing.assert_allclose(losses.dac_kl(s, t, lower=lower, upper=upper, reduction="none"),
                               np_clipped_kl(s, t, region), rtol=1e-5, atol=1e-6)
    # (0, 1) keeps everything: the forward KL. The top half only: the teacher's 4 most probable of 7.
    np.testing.assert_allclose(losses.dac_kl(s, t, lower=0.0, upper=1.0), losses.forward_kl(s, t), rtol=1e-6)
    assert np.all(np.asarray(losses.dac_kl_region(t, lower=0.5, upper=1.0)).sum(-1) == 4)
    # An empty region (both quantiles between the same order statistics) gives 0, no NaN.
    lo = np.full((B, T), 0.55, np.float32)
    assert np.all(np.asarray(losses.dac_kl_region(t, lower=lo, upper=lo + 0.05)).sum(-1) == 0)
    assert np.all(np.asarray(losses.dac_kl(s, t, lower=lo, upper=lo + 0.05, reduction="none")) == 0)


def test_dac_kl_gradients_match_finite_differences():
    with jax.enable_x64(True):
        z = np.stack([logits(28), logits(29)]).astype(np.float64)
        f = lambda z: losses.dac_kl(z[0], z[1], lower=0.2, upper=0.95, mask=MASK)
        # Entries outside the region have exactly zero gradient; the differences there are rounding (~1e-10).
        np.testing.assert_allclose(jax.jit(jax.grad(f))(z), central_differences(f, z), rtol=1e-6, atol=1e-9)


def np_span(s, t, span_ids, mask):
    ps, pt = np.exp(np_log_softmax(s.astype(np.float64))), np.exp(np_log_softmax(t.astype(np.float64)))
    vals = []
    for b in range(B):
        for i in range(T - 1):
            if span_ids[b, i] >= 0 and span_ids[b, i] == span_ids[b, i + 1] and mask[b, i] and mask[b, i + 1]:
                vals.append(((pt[b, i] * pt[b, i + 1] - ps[b, i] * ps[b, i + 1]) ** 2).sum())
    return np.mean(vals) if vals else 0.0


def test_span_correlation_loss():
    s, t = logits(30, scale=2.5), logits(31, scale=2.5)
    spans = np.array([[0, 0, 0, -1, 1], [2, 2, 3, 3, 3], [-1, 4, 4, 5, 5]], np.int32)
    np.testing.assert_allclose(losses.span_correlation_loss(s, t, spans, MASK), np_span(s, t, spans, MASK), rtol=1e-5)
    np.testing.assert_allclose(losses.span_correlation_loss(s, t, spans), np_span(s, t, spans, np.ones((B, T), bool)), rtol=1e-5)
    assert float(losses.span_correlation_loss(s, t, np.full((B, T), -1, np.int32))) == 0.0
    assert float(losses.span_correlation_loss(t, t, spans)) == 0.0
    with jax.enable_x64(True):
        z = np.stack([s, t]).astype(np.float64)
        f = lambda z: losses.span_correlation_loss(z[0], z[1], spans, MASK)
        np.testing.assert_allclose(jax.jit(jax.grad(f))(z), central_differences(f, z), rtol=1e-6, atol=1e-10)


def test_bad_arguments_raise():
    z = logits(32)
    y = np.zeros((B, T), np.int32)
    v = np.zeros(B, np.float32)
    for bad, match in [
        (lambda: losses.token_log_probs(z, y[:, :3]), "targets must have shape"),
        (lambda: losses.token_log_probs(z, y + V), "targets: label"),
        (lambda: losses.token_log_probs(z, y.astype(np.float32)), "targets must be integers"),
        (lambda: losses.sequence_log_probs(z, y, MASK[:2]), "mask must have"),
        (lambda: losses.dpo_loss(v, v, v, v, beta=0.0), "beta"),
        (lambda: losses.dpo_loss(v, v, v, v, label_smoothing=0.6), "label_smoothing must lie"),
        (lambda: losses.dpo_loss(v, v, v, v[:2]), "same shape"),
        (lambda: losses.kto_pair_loss(v, v, v, v, beta=-1.0), "beta"),
        (lambda: losses.kto_pair_loss(z, z, z, z), r"\[batch\]"),
        (lambda: losses.adpa(z, z, z[..., :5]), "number of classes"),
        (lambda: losses.adpa(z, z, z, top_k=V + 1), "top_k"),
        (lambda: losses.adpa(z, z, z, advantage_range=(1.0, 0.0)), "low <= high"),
        (lambda: losses.adpa(z, z, z, advantage_range=0.5), r"\(low, high\)"),
        (lambda: losses.dckd_loss(z, z, MASK, z, z, MASK, rejected_weight=-1.0), "rejected_weight"),
        (lambda: losses.dac_kl(z, z, lower=0.8, upper=0.2), "lower must be <= upper"),
        (lambda: losses.dac_kl(z, z, lower=-0.1, upper=0.5), "lower must lie"),
        (lambda: losses.dac_kl(z, z, lower=np.zeros((4,)), upper=1.0), "lower must broadcast"),
        (lambda: losses.dac_kl(z, z, lower=0.0, upper=np.ones((2, B, T))), "upper must broadcast"),
        (lambda: losses.span_correlation_loss(z, z, y.astype(np.float32)), "span_ids must be integers"),
        (lambda: losses.span_correlation_loss(z, z, y[:, :2]), "span_ids must have shape"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()
