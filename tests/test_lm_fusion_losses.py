"""Multi-model LM distillation losses: InfiGFusion's graph-on-logits loss (jaxkd/losses/fusion/infigfusion.py) and
FuseLLM's token alignment, fused target and loss (jaxkd/losses/fusion/fusellm.py).

Values against float64 NumPy references written from the formulas (the co-activation graph formed
explicitly, the 1-D Wasserstein distance by replicating atoms; FuseLLM's MinCE/AvgCE as the official
trainer computes them), gradients against float64 central differences, masked positions, all-masked
batches and argument checks.
"""

import jax
import numpy as np
import pytest

from jaxkd import losses as L
from tests.numpy_reference import np_log_softmax, np_masked_softmax, rand_logits
from tests.test_loss_contract import central_differences


MASK = np.array([[True, True, True, False], [True, True, False, False]])


# ----- InfiGFusion GLD -----


def np_strengths(z, k, mask, values):
    """Strengths from the explicit graph A = Σ_t z̃_t z̃_tᵀ, and the active channels, per sequence."""
    z = np.asarray(z, np.float64)
    x = np_masked_softmax(z) if values == "probs" else z
    out, act = [], []
    for b in range(z.shape[0]):
        graph = np.zeros((z.shape[-1], z.shape[-1]))
        active = np.zeros(z.shape[-1], bool)
        for t in range(z.shape[1]):
            if not mask[b, t]:
                continue
            top = np.argsort(-z[b, t])[:k]
            row = np.zeros(z.shape[-1])
            row[top] = x[b, t, top]
            graph += np.outer(row, row)
            active[top] = True
        out.append(graph.sum(1))
        act.append(active)
    return out, act


def np_w2_squared(x, y):
    """W₂² between uniform distributions on x (n atoms) and y (m atoms): replicate to n·m atoms each."""
    if len(x) == 0 or len(y) == 0:
        return 0.0
    xs, ys = np.repeat(np.sort(x), len(y)), np.repeat(np.sort(y), len(x))
    return float(np.mean((xs - ys) ** 2))


def np_gld(zs, zt, k, mask, values="logits"):
    ss, acts = np_strengths(zs, k, mask, values)
    st, actt = np_strengths(zt, k, mask, values)
    return np.array([np_w2_squared(ss[b][acts[b]], st[b][actt[b]]) for b in range(len(ss))])


@pytest.mark.parametrize("values", ["logits", "probs"])
def test_node_strengths_are_the_row_sums_of_the_explicit_co_activation_graph(values):
    z = rand_logits(2, (2, 4, 7))
    z[0, 1, 3] = -np.inf  # an excluded channel is never active and counts 0
    strengths, active = L.infigfusion_node_strengths(z, 3, MASK, values=values)
    want, want_active = np_strengths(z, 3, MASK, values)
    np.testing.assert_allclose(strengths, np.stack(want), rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(active, np.stack(want_active))
    assert not active[0, 3] and strengths[0, 3] == 0.0
    # Sequence 1 has 2 valid positions of 3 channels each: at most 6 active channels, at least 3.
    assert 3 <= int(np.sum(active[1])) <= 6


@pytest.mark.parametrize("values", ["logits", "probs"])
def test_gld_matches_numpy_with_different_vocabularies(values):
    zs, zt = rand_logits(0, (2, 4, 7)), rand_logits(1, (2, 4, 9))
    got = L.infigfusion(zs, zt, k=3, values=values, mask=MASK, reduction="none")
    want = np_gld(zs, zt, 3, MASK, values)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    assert np.all(want > 0)
    np.testing.assert_allclose(L.infigfusion(zs, zt, k=3, values=values, mask=MASK), want.mean(), rtol=2e-5)


def test_gld_is_invariant_to_relabelling_the_vocabulary_and_zero_for_the_same_graph():
    zs, zt = rand_logits(2, (2, 4, 7)), rand_logits(3, (2, 4, 7))
    perm = np.random.default_rng(0).permutation(7)
    base = L.infigfusion(zs, zt, k=3, reduction="none")
    np.testing.assert_allclose(L.infigfusion(zs[..., perm], zt, k=3, reduction="none"), base, rtol=1e-5)
    np.testing.assert_allclose(L.infigfusion(zs[..., perm], zs, k=3, reduction="none"), 0.0, atol=1e-5)
    # A NaN logit at a valid position makes its sequence NaN even outside the top-k; at a masked one, nothing.
    bad = zs.copy()
    bad[0, 1, np.argmin(zs[0, 1])] = np.nan
    got = np.asarray(L.infigfusion(bad, zt, k=3, reduction="none"))
    assert np.isnan(got[0]) and np.isfinite(got[1])
    mask = np.ones((2, 4), bool)
    mask[0, 1] = False
    assert np.all(np.isfinite(L.infigfusion(bad, zt, k=3, mask=mask, reduction="none")))


def test_gld_gradient_matches_float64_finite_differences_and_masks_hold():
    zs, zt = rand_logits(4, (2, 3, 5)), rand_logits(5, (2, 3, 6))
    mask = np.array([[True, True, False], [True, False, False]])
    garbage = np.where(mask[..., None], zs, 7.0 * rand_logits(6, zs.shape))
    with jax.enable_x64(True):
        x, t = zs.astype(np.float64), zt.astype(np.float64)
        w = np.array([0.7, 1.3])
        f = lambda s, m: L.infigfusion(s, t, k=2, mask=m, weights=w, reduction="sum")  # noqa: E731
        value_and_grad = jax.jit(jax.value_and_grad(f))  # the mask is an argument: one compiled program
        value, grad = value_and_grad(x, mask)
        np.testing.assert_allclose(grad, central_differences(lambda s: f(s, mask), x), rtol=1e-6, atol=1e-8)
        assert np.any(grad != 0)
        # Masked positions: any finite values there change neither the value nor the gradient.
        value2, grad2 = value_and_grad(garbage.astype(np.float64), mask)
        np.testing.assert_allclose(value2, value, rtol=1e-12)
        np.testing.assert_allclose(grad2, grad, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)
        # Nothing valid: 0 and zero gradients.
        value3, grad3 = value_and_grad(x, np.zeros_like(mask))
        assert float(value3) == 0.0
        np.testing.assert_array_equal(grad3, 0.0)


def test_gld_rejects_bad_inputs():
    zs, zt = rand_logits(0, (2, 4, 5)), rand_logits(1, (2, 4, 6))
    with pytest.raises(ValueError, match="k=6 is larger than the vocabulary"):
        L.infigfusion(zs, zt, k=6)
    with pytest.raises(ValueError, match="same positions"):
        L.infigfusion(zs, zt[:, :3], k=2)
    with pytest.raises(ValueError, match="values must be one of"):
        L.infigfusion(zs, zt, k=2, values="softmax")
    with pytest.raises(ValueError, match="mask must have shape"):
        L.infigfusion(zs, zt, k=2, mask=np.ones((2, 3), bool))


# ----- FuseLLM: alignment (host) -----


def test_token_alignment_matches_a_hand_worked_dtw():
    base = ["▁Hello", "▁world", "!"]
    blend = ["ĠHel", "lo", "Ġworld", "!"]
    # Edit distances (markers stripped): "Hel"/"lo" vs "Hello" are 2 and 3, "world" and "!" match exactly.
    alignment = L.fusellm_token_alignment(base, blend, base_prefix="▁", blending_prefix="Ġ")
    assert alignment == [[0, 1], [2], [3]]
    # One blending token covering two base tokens: both base tokens map to it.
    assert L.fusellm_token_alignment(["a", "b", "c"], ["ab", "c"]) == [[0], [0], [1]]
    with pytest.raises(ValueError, match="non-empty"):
        L.fusellm_token_alignment([], ["a"])


def test_align_logits_moves_matched_steps_and_falls_back_to_one_hot():
    base_vocab = {"▁Hello": 0, "▁world": 1, "!": 2, "▁the": 3}
    blend_vocab = ["ĠHel", "lo", "Ġworld", "!", "Ġthe", "Ġthe"]  # a duplicate string lands on one base id
    blend = ["ĠHel", "lo", "Ġworld", "!"]
    logits = np.array(
        [
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            [-1.0, -2.0, 2.5, 0.5, 1.5, 0.7],
            [0.0, 0.0, 0.0, 9.0, 0.0, 0.0],
        ],
        np.float32,
    )
    out = L.fusellm_align_logits(["▁Hello", "▁world", "!"], blend, logits, base_vocab, blend_vocab,
                                 base_prefix="▁", blending_prefix="Ġ")
    inf = -np.inf
    want = np.array(
        [
            [0.0, inf, inf, inf],  # "▁Hello" matched two blending tokens: one-hot on itself
            [inf, 2.5, 0.5, 1.5],  # "Ġworld" step: world->1, !->2, the->3 (max of 1.5 and 0.7)
            [inf, 0.0, 9.0, 0.0],  # "!" step
        ],
        np.float32,
    )
    np.testing.assert_array_equal(out, want)
    top = L.fusellm_align_logits(["▁Hello", "▁world", "!"], blend, logits, base_vocab, blend_vocab,
                                 base_prefix="▁", blending_prefix="Ġ", top_k=2)
    np.testing.assert_array_equal(top[1], [inf, 2.5, inf, 1.5])
    with pytest.raises(ValueError, match="blending_logits has 5 vocabulary entries"):
        L.fusellm_align_logits(["!"], ["!"], np.zeros((1, 5)), base_vocab, blend_vocab)


# ----- FuseLLM: fused target and loss -----


def np_sequence_ce(zt, y, mask):
    lp = np_log_softmax(zt)  # [M, B, T, V]
    ce = -np.take_along_axis(lp, np.broadcast_to(y[None, ..., None], lp.shape[:-1] + (1,)), -1)[..., 0]
    return (ce * mask).sum(-1) / np.maximum(mask.sum(-1), 1)


def np_fused(zt, y, mask, rule, temperature=1.0):
    p = np.exp(np_log_softmax(zt, temperature))
    ce = np_sequence_ce(zt, y, mask)  # [M, B]
    if rule == "min_ce":
        best = ce.argmin(0)
        return np.stack([p[best[b], b] for b in range(p.shape[1])])
    reward = np.exp(-ce)
    w = np.exp(reward) / np.exp(reward).sum(0)
    return np.einsum("mb,mbtv->btv", w, p)


def fusion_data(seed=0, m=3, shape=(2, 4, 5)):
    rng = np.random.default_rng(seed)
    zs = rand_logits(seed + 10, shape)
    zt = rand_logits(seed + 20, (m,) + shape)
    y = rng.integers(0, shape[-1], size=shape[:-1]).astype(np.int32)
    return zs, zt, y


@pytest.mark.parametrize("rule", ["min_ce", "avg_ce"])
def test_fused_target_matches_numpy(rule):
    _, zt, y = fusion_data()
    got = np.exp(L.fusellm_fused_target(zt, y, MASK, rule=rule, temperature=2.0))
    np.testing.assert_allclose(got, np_fused(zt, y, MASK, rule, 2.0), rtol=2e-5, atol=1e-7)


def test_min_ce_picks_the_teacher_that_predicts_the_gold_tokens():
    _, zt, y = fusion_data(1)
    zt = zt.copy()
    zt[2, 0] += 20.0 * np.eye(5, dtype=np.float32)[y[0]]  # teacher 2 is confident and right on sequence 0
    zt[1, 1] += 20.0 * np.eye(5, dtype=np.float32)[y[1]]  # teacher 1 on sequence 1
    fused = L.fusellm_fused_target(zt, y, MASK)
    np.testing.assert_allclose(fused[0], np_log_softmax(zt[2, 0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused[1], np_log_softmax(zt[1, 1]), rtol=1e-5, atol=1e-5)


def test_top_k_keeps_each_teachers_k_largest_logits():
    _, zt, y = fusion_data(2, m=1)
    got = np.exp(L.fusellm_fused_target(zt, y, MASK, top_k=2))
    kth = np.sort(zt[0], -1)[..., -2:-1]
    want = np_masked_softmax(np.where(zt[0] >= kth, zt[0], -np.inf))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rule,divergence", [("min_ce", "ce"), ("avg_ce", "kl")])
def test_fusellm_loss_matches_numpy(rule, divergence):
    zs, zt, y = fusion_data(3)
    lam = 0.7
    pf = np_fused(zt, y, MASK, rule)
    ls = np_log_softmax(zs)
    gold = -np.take_along_axis(ls, y[..., None], -1)[..., 0]
    soft = -(pf * ls).sum(-1)
    if divergence == "kl":
        soft -= -(pf * np.log(pf)).sum(-1)
    want = lam * gold + (1 - lam) * soft
    got = L.fusellm(zs, zt, y, lm_weight=lam, rule=rule, divergence=divergence, mask=MASK, reduction="none")
    np.testing.assert_allclose(np.asarray(got)[MASK], want[MASK], rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(got)[~MASK], 0.0)
    mean = L.fusellm(zs, zt, y, lm_weight=lam, rule=rule, divergence=divergence, mask=MASK)
    np.testing.assert_allclose(mean, want[MASK].mean(), rtol=2e-5)


def test_fusellm_gradients_match_float64_finite_differences_and_masks_hold():
    zs, zt, y = fusion_data(4, m=2, shape=(2, 3, 4))
    mask = np.array([[True, True, False], [True, False, False]])
    y_garbage = np.where(mask, y, -100)  # padding labels (Hugging Face's ignore index) at masked positions
    with jax.enable_x64(True):
        s64, t64 = zs.astype(np.float64), zt.astype(np.float64)

        def f(s, t, y, m):
            return L.fusellm(s, t, y, rule="avg_ce", divergence="kl", mask=m, lm_weight=0.6)

        value_and_grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
        value, (gs, gt) = value_and_grad(s64, t64, y, mask)
        # Student and teacher logits in one vector: one compiled finite-difference program.
        split = lambda v: (v[: s64.size].reshape(s64.shape), v[s64.size:].reshape(t64.shape))  # noqa: E731
        both = np.concatenate([s64.ravel(), t64.ravel()])
        fd = central_differences(lambda v: f(*split(v), y, mask), both)
        np.testing.assert_allclose(gs, split(fd)[0], rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(gt, split(fd)[1], rtol=1e-6, atol=1e-8)
        garbage_s = np.where(mask[..., None], s64, 5.0 * rand_logits(7, zs.shape))
        value2, (gs2, _) = value_and_grad(garbage_s, t64, y_garbage, mask)
        np.testing.assert_allclose(value2, value, rtol=1e-12)
        np.testing.assert_allclose(gs2, gs, rtol=1e-12, atol=1e-15)
        value3, (gs3, gt3) = value_and_grad(s64, t64, np.full_like(y, -100), np.zeros_like(mask))
        assert float(value3) == 0.0
        np.testing.assert_array_equal(gs3, 0.0)
        np.testing.assert_array_equal(gt3, 0.0)


def test_fusellm_rejects_bad_inputs():
    zs, zt, y = fusion_data()
    with pytest.raises(ValueError, match="student has 5, teacher has 6"):
        L.fusellm(zs, np.zeros(zt.shape[:-1] + (6,), np.float32), y)
    with pytest.raises(ValueError, match=r"\[M, \.\.\., V\]"):
        L.fusellm(zs, zt[0], y)
    with pytest.raises(ValueError, match="targets must have shape"):
        L.fusellm_fused_target(zt, y[:, :3])
    with pytest.raises(ValueError, match="rule must be one of"):
        L.fusellm_fused_target(zt, y, rule="max_ce")
    with pytest.raises(ValueError, match="lm_weight must lie in"):
        L.fusellm(zs, zt, y, lm_weight=1.5)
    with pytest.raises(ValueError, match="targets: label 5"):
        L.fusellm_fused_target(zt, np.full_like(y, 5))
    with pytest.raises(ValueError, match="top_k=6 is larger"):
        L.fusellm_fused_target(zt, y, top_k=6)
    # Padding labels at masked positions are accepted (only valid positions are checked).
    L.fusellm(zs, zt, np.where(MASK, y, -100), mask=MASK)
