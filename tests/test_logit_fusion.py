"""Decoding-time logit fusion (jaxkd/losses/fusion/logit_fusion.py): proxy-tuning and dynamic logits fusion
against float64 NumPy references (the paper's Eq. 5 objective and a brute-force search over the same
candidates), the edge cases (α = 0 and a grid of 0 give the large model; one expert; a large model equal
to the small base recovers the expert), excluded entries and argument checks. These are decoding-time
functions, not losses.
"""

import itertools

import jax
import numpy as np
import pytest

from jaxkd import losses as L
from tests.numpy_reference import np_kl_finite, np_log_softmax, np_masked_softmax, rand_logits


GRID = [round(0.1 * i, 1) for i in range(21)]


def test_proxy_tuning_matches_numpy_and_log_softmax_inputs_give_the_same_distribution():
    large, tuned, untuned = rand_logits(0, (3, 7)), rand_logits(1, (3, 7)), rand_logits(2, (3, 7))
    got = L.proxy_tuning_logits(large, tuned, untuned, alpha=0.8)
    want = large.astype(np.float64) + 0.8 * (tuned.astype(np.float64) - untuned)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # The paper's product of experts p_L · p_tuned / p_untuned, renormalized.
    poe = np.exp(np_log_softmax(large)) * (np.exp(np_log_softmax(tuned)) / np.exp(np_log_softmax(untuned))) ** 0.8
    np.testing.assert_allclose(np_masked_softmax(np.asarray(got)), poe / poe.sum(-1, keepdims=True), rtol=1e-5)
    log_probs = (np_log_softmax(x).astype(np.float32) for x in (large, tuned, untuned))
    from_log_probs = np.asarray(L.proxy_tuning_logits(*log_probs, alpha=0.8))
    np.testing.assert_allclose(np_masked_softmax(from_log_probs), np_masked_softmax(np.asarray(got)), rtol=1e-5)
    np.testing.assert_array_equal(L.proxy_tuning_logits(large, tuned, untuned, alpha=0.0), large)


def test_proxy_tuning_excluded_entries():
    large, tuned, untuned = (rand_logits(s, (2, 5)) for s in (3, 4, 5))
    large[0, 1] = tuned[0, 2] = untuned[1, 3] = -np.inf
    got = np.asarray(L.proxy_tuning_logits(large, tuned, untuned))
    assert np.isneginf(got[0, 1]) and np.isneginf(got[0, 2]) and np.isneginf(got[1, 3])
    assert np.isfinite(got).sum() == 7
    # With α = 0 only the large model's exclusions remain.
    assert np.isfinite(L.proxy_tuning_logits(large, tuned, untuned, alpha=0.0)).sum() == 9
    grads = jax.grad(lambda t: L.proxy_tuning_logits(large, t, untuned)[np.isfinite(got)].sum())(tuned)
    assert np.all(np.isfinite(grads)) and grads[0, 2] == 0.0


def np_objective(large, experts, base, alpha):
    """Eq. 5 of Fan et al. (NeurIPS 2024) for one row."""
    p = np_masked_softmax(large)
    fused = large.astype(np.float64) + sum(a * (e.astype(np.float64) - base) for a, e in zip(alpha, experts))
    pt = np_masked_softmax(fused)
    q = np_masked_softmax(base)
    total = 0.0
    for e in experts:
        qe = np_masked_softmax(e)
        total += (np_kl_finite(pt, p) - np_kl_finite(qe, q)) ** 2 + (np_kl_finite(p, pt) - np_kl_finite(q, qe)) ** 2
    return total


def np_search(large, experts, base, candidates):
    """Brute force: the first candidate with the smallest objective, per row."""
    out = []
    for r in range(large.shape[0]):
        values = [np_objective(large[r], experts[:, r], base[r], c) for c in candidates]
        out.append(candidates[int(np.argmin(values))])
    return np.array(out)


def test_objective_matches_numpy():
    large, base, experts = rand_logits(6, (3, 6)), rand_logits(7, (3, 6)), rand_logits(8, (2, 3, 6))
    alphas = np.array([[0.3, 1.2], [0.0, 0.0], [2.0, 0.5]], np.float32)
    got = L.dynamic_fusion_objective(large, experts, base, alphas)
    want = [np_objective(large[r], experts[:, r], base[r], alphas[r]) for r in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("search", ["one_expert", "grid"])
def test_dynamic_fusion_matches_a_brute_force_search(search):
    large, base, experts = rand_logits(9, (4, 6)), rand_logits(10, (4, 6)), rand_logits(11, (2, 4, 6))
    grid = [0.0, 0.5, 1.0, 1.5, 2.0]
    fused, alphas = L.dynamic_logits_fusion(large, experts, base, alpha_grid=grid, search=search)
    if search == "one_expert":
        candidates = [np.eye(2)[t] * a for t in range(2) for a in grid]
    else:
        candidates = [np.array(c) for c in itertools.product(grid, repeat=2)]
    want = np_search(large, experts, base, candidates)
    np.testing.assert_allclose(alphas, want)
    np.testing.assert_allclose(fused, large + np.einsum("re,erv->rv", want, experts - base[None]), rtol=1e-5, atol=1e-5)
    assert np.any(want != 0)


def test_single_expert_edge_cases():
    large, base, expert = rand_logits(12, (3, 6)), rand_logits(13, (3, 6)), rand_logits(14, (1, 3, 6))
    fused, alphas = L.dynamic_logits_fusion(large, expert, base)
    want = np_search(large, expert, base, [np.array([a]) for a in GRID])
    np.testing.assert_allclose(alphas, want)
    # A grid holding only 0 leaves the large model as it is.
    fused0, alphas0 = L.dynamic_logits_fusion(large, expert, base, alpha_grid=[0.0])
    np.testing.assert_array_equal(fused0, large)
    np.testing.assert_array_equal(alphas0, 0.0)
    # When the large model is the small base, α = 1 reproduces the expert exactly: the objective is 0 there.
    fused1, alphas1 = L.dynamic_logits_fusion(base, expert, base)
    np.testing.assert_allclose(alphas1, 1.0)
    np.testing.assert_allclose(fused1, expert[0], rtol=1e-6, atol=1e-6)
    # An expert identical to the base: every α gives the same distribution, ties go to the first (0).
    _, alphas_same = L.dynamic_logits_fusion(large, base[None], base)
    np.testing.assert_array_equal(alphas_same, 0.0)


def test_fusion_rejects_bad_inputs():
    large, base, experts = rand_logits(0, (2, 5)), rand_logits(1, (2, 5)), rand_logits(2, (3, 2, 5))
    with pytest.raises(ValueError, match="large_logits has 5, tuned_logits has 6"):
        L.proxy_tuning_logits(large, rand_logits(3, (2, 6)), base)
    with pytest.raises(ValueError, match="same shape"):
        L.proxy_tuning_logits(large, rand_logits(3, (3, 5)), base)
    with pytest.raises(ValueError, match="large_logits has 5, expert_logits\\[e\\] has 4"):
        L.dynamic_logits_fusion(large, rand_logits(3, (3, 2, 4)), base)
    with pytest.raises(ValueError, match="leading axis"):
        L.dynamic_logits_fusion(large, large, base)
    with pytest.raises(ValueError, match=r"21\^4 = 194481 weight vectors"):
        L.dynamic_logits_fusion(large, rand_logits(4, (4, 2, 5)), base, search="grid")
    with pytest.raises(ValueError, match="search must be one of"):
        L.dynamic_logits_fusion(large, experts, base, search="random")
    with pytest.raises(ValueError, match="alphas must have shape"):
        L.dynamic_fusion_objective(large, experts, base, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        L.proxy_tuning_logits(large, large, base, alpha=float("nan"))
