"""Tests for jaxkd.models.sampling: the filtered sampling distribution against NumPy sets and empirical
frequencies, the model-agnostic scan loop on a toy Markov chain, and KV-cached generation against the
full forward pass (greedy decoding and the sampled tokens' log-probabilities)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd.models import lm as lmlib
from jaxkd.models import sampling
from tests.test_lm_model import CFG, _setup

V = 11


def _logits(seed, shape=(4, V)):
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 2
    x[0, [2, 5]] = x[0].max() + 1.0  # a tie at the top
    x[1, [1, 3, 7]] = -np.inf  # excluded vocabulary
    x[2, [4, 6]] = np.sort(x[2])[-3]  # ties at rank 3
    return x


def _np_softmax(x):
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def _np_allowed(row, temperature=1.0, top_k=None, top_p=None):
    """The kept set from the definitions: the entries >= the k-th largest logit, then the smallest set of
    most probable entries with probability >= p (plus entries tied with its least probable one)."""
    x = row.astype(np.float64) / temperature
    keep = np.isfinite(x)
    if top_k is not None and top_k < x.size:
        keep &= x >= np.sort(x)[::-1][top_k - 1]
    if top_p is not None:
        probs = _np_softmax(np.where(keep, x, -np.inf))
        order = np.argsort(-probs, kind="stable")
        total, nucleus = 0.0, []
        for i in order:
            nucleus.append(i)
            total += probs[i]
            if total >= top_p:
                break
        keep &= probs >= probs[nucleus[-1]]
    return keep, np.where(keep, x, -np.inf)


def test_greedy_is_exact_argmax():
    logits = _logits(0)
    tokens = sampling.sample_logits(logits, jax.random.key(0), temperature=0.0, top_k=3, top_p=0.1)
    np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))  # first index on ties (row 0)
    assert tokens.dtype == jnp.int32


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 1, None), (1.0, 3, None), (0.7, 5, None), (1.0, V + 2, None),
    (1.0, None, 0.3), (0.5, None, 0.6), (2.0, None, 0.9), (1.0, None, 1.0), (1.3, 4, 0.7),
])
def test_filtered_distribution_matches_numpy(temperature, top_k, top_p):
    logits = _logits(1)
    log_p = np.asarray(sampling.filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p))
    for row, got in zip(logits, log_p):
        keep, kept_logits = _np_allowed(row, temperature, top_k, top_p)
        np.testing.assert_array_equal(np.isfinite(got), keep)
        expected = np.log(_np_softmax(kept_logits)[keep])
        np.testing.assert_allclose(got[keep], expected, rtol=1e-5, atol=1e-6)
        if top_k is not None and top_k < V and top_p is None:
            # ties at the k-th logit are all kept, so at least min(k, finite entries) survive
            assert keep.sum() >= min(top_k, np.isfinite(row).sum())
    assert np.all(np.isfinite(log_p).sum(-1) >= 1)  # the top entry always survives


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.8, 5, None), (1.0, None, 0.8), (1.0, None, None)])
def test_empirical_frequencies_match_the_renormalized_distribution(temperature, top_k, top_p):
    n = 6000
    row = _logits(2)[1]  # has -inf entries
    keep, kept = _np_allowed(row, temperature, top_k, top_p)
    expected = _np_softmax(kept)

    @jax.jit
    def draw(rng):
        return sampling.sample_logits(jnp.broadcast_to(row, (n, V)), rng, temperature=temperature, top_k=top_k,
                                      top_p=top_p)

    tokens = np.asarray(draw(jax.random.key(3)))
    freq = np.bincount(tokens, minlength=V) / n
    assert np.all(freq[~keep] == 0)  # removed and -inf entries are never sampled
    np.testing.assert_allclose(freq, expected, atol=0.025)


def test_sampling_option_errors():
    x, key = _logits(0), jax.random.key(0)
    with pytest.raises(ValueError, match="temperature"):
        sampling.sample_logits(x, key, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        sampling.sample_logits(x, key, top_k=0)
    with pytest.raises(ValueError, match="top_p must lie in"):
        sampling.sample_logits(x, key, top_p=0.0)
    with pytest.raises(ValueError, match="temperature > 0"):
        sampling.filter_logits(x, temperature=0.0)


# ----- the generic loop on a toy Markov chain: next logits = TABLE[previous token] -----

TABLE = np.random.default_rng(4).normal(size=(V, V)).astype(np.float32) * 2


def _chain_step(count, token):
    return jnp.asarray(TABLE)[token], count + 1


def test_sample_loop_log_probs_and_eos_mask():
    first = _logits(5)
    opts = dict(temperature=0.9, top_k=6, top_p=0.95)
    run = jax.jit(lambda rng, eos: sampling.sample_loop(_chain_step, jnp.zeros(()), first, rng, max_new_tokens=6,
                                                        eos_id=eos, **opts), static_argnums=1)
    tokens, mask, log_probs = map(np.asarray, run(jax.random.key(6), None))
    assert tokens.shape == mask.shape == log_probs.shape == (4, 6) and mask.all()
    for b in range(4):
        prev_logits = first[b]
        for i in range(6):
            keep, kept = _np_allowed(prev_logits, opts["temperature"], opts["top_k"], opts["top_p"])
            assert keep[tokens[b, i]]
            np.testing.assert_allclose(log_probs[b, i], np.log(_np_softmax(kept)[tokens[b, i]]), rtol=1e-5, atol=1e-5)
            prev_logits = TABLE[tokens[b, i]]
    # The same draws with an EOS: identical up to each row's first EOS, then EOS filler, masked, scored 0.
    eos = int(tokens[0, 2])
    e_tokens, e_mask, e_log_probs = map(np.asarray, run(jax.random.key(6), eos))
    for b in range(4):
        hits = np.flatnonzero(tokens[b] == eos)
        stop = hits[0] + 1 if hits.size else 6
        np.testing.assert_array_equal(e_tokens[b, :stop], tokens[b, :stop])
        np.testing.assert_array_equal(e_tokens[b, stop:], eos)
        np.testing.assert_array_equal(e_mask[b], np.arange(6) < stop)
        np.testing.assert_allclose(e_log_probs[b, :stop], log_probs[b, :stop], rtol=1e-6)
        np.testing.assert_array_equal(e_log_probs[b, stop:], 0.0)


def test_sample_loop_greedy_and_short_lengths():
    first = _logits(7)
    tokens, mask, log_probs = sampling.sample_loop(_chain_step, 0, first, jax.random.key(0), max_new_tokens=4,
                                                   temperature=0.0)
    expected = [np.argmax(first, -1)]
    for _ in range(3):
        expected.append(np.argmax(TABLE[expected[-1]], -1))
    np.testing.assert_array_equal(tokens, np.stack(expected, 1))
    np.testing.assert_array_equal(log_probs, 0.0)
    one = sampling.sample_loop(_chain_step, 0, first, jax.random.key(0), max_new_tokens=1, temperature=0.0)
    np.testing.assert_array_equal(one[0], np.argmax(first, -1)[:, None])
    none = sampling.sample_loop(_chain_step, 0, first, jax.random.key(0), max_new_tokens=0)
    assert [a.shape for a in none] == [(4, 0)] * 3
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        sampling.sample_loop(_chain_step, 0, first, jax.random.key(0), max_new_tokens=-1)


# ----- generation with the KV cache against the full forward pass -----

P, N = 3, 3
PROMPT_MASK = np.array([[1, 1, 1], [0, 1, 1], [1, 1, 0]], bool)  # full, left-padded, right-padded


def _prompt(seed=11):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (3, P)).astype(np.int32)


def test_greedy_generation_equals_a_full_forward_greedy_loop():
    _, _, params, forward = _setup()
    prompt = _prompt()
    gen = jax.jit(lambda p, rng: sampling.generate(CFG, p, prompt, PROMPT_MASK, rng=rng, max_new_tokens=N,
                                                   temperature=0.0))(params, jax.random.key(0))
    # Independent loop: re-run the whole (padded) sequence each step, take the last real token's argmax.
    tokens = np.zeros((3, P + N), np.int32)
    mask = np.zeros((3, P + N), bool)
    tokens[:, :P], mask[:, :P] = prompt, PROMPT_MASK
    for j in range(N):
        logits, _ = forward(params, tokens, mask)
        last = np.array([np.flatnonzero(m)[-1] for m in mask])
        tokens[:, P + j] = np.argmax(np.asarray(logits)[np.arange(3), last], -1)
        mask[:, P + j] = True
    np.testing.assert_array_equal(gen.tokens, tokens)
    np.testing.assert_array_equal(gen.mask, mask)
    np.testing.assert_array_equal(gen.new_tokens, tokens[:, P:])
    assert gen.new_mask.all() and np.all(gen.log_probs == 0)


def test_sampled_generation_log_probs_match_the_full_forward_and_have_no_gradient():
    _, _, params, forward = _setup()
    opts = dict(temperature=0.8, top_k=6, top_p=0.9)

    @jax.jit
    def run(params, rng):
        def total(params):
            gen = sampling.generate(CFG, params, _prompt(), PROMPT_MASK, rng=rng, max_new_tokens=N, **opts)
            return gen.log_probs.sum(), gen
        return jax.grad(total, has_aux=True)(params)

    grads, gen = run(params, jax.random.key(12))
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))  # sampling is not differentiated
    logits, _ = forward(params, np.asarray(gen.tokens), np.asarray(gen.mask))
    logits = np.asarray(logits)
    last = np.array([np.flatnonzero(m)[-1] for m in PROMPT_MASK])
    for b in range(3):
        for j in range(N):
            t = last[b] if j == 0 else P + j - 1  # the position whose logits predict new token j
            keep, kept = _np_allowed(logits[b, t], **opts)
            token = int(gen.new_tokens[b, j])
            assert keep[token], (b, j)
            np.testing.assert_allclose(gen.log_probs[b, j], np.log(_np_softmax(kept)[token]), rtol=1e-4, atol=1e-5)


def test_generation_lengths_and_errors():
    params = _setup()[2]
    prompt, key = _prompt(), jax.random.key(0)
    same = sampling.generate(CFG, params, prompt, PROMPT_MASK, rng=key, max_new_tokens=0)  # documented: the prompt
    np.testing.assert_array_equal(same.tokens, prompt)
    np.testing.assert_array_equal(same.mask, PROMPT_MASK)
    assert same.new_tokens.shape == same.new_mask.shape == same.log_probs.shape == (3, 0)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        sampling.generate(CFG, params, prompt, rng=key, max_new_tokens=-1)
    with pytest.raises(ValueError, match=r"prompt length 3 \+ max_new_tokens 6 = 9 exceeds the model's max_len=8"):
        sampling.generate(CFG, params, prompt, rng=key, max_new_tokens=6)
    with pytest.raises(ValueError, match="prompt_tokens must be integer ids"):
        sampling.generate(CFG, params, prompt.astype(np.float32), rng=key, max_new_tokens=1)
    with pytest.raises(ValueError, match="eos_id must lie in"):
        sampling.generate(CFG, params, prompt, rng=key, max_new_tokens=1, eos_id=CFG.vocab_size)
    with pytest.raises(ValueError, match="prompt_mask must have the prompt's shape"):
        sampling.generate(CFG, params, prompt, PROMPT_MASK[:, :2], rng=key, max_new_tokens=1)
    with pytest.raises(ValueError, match="top_p"):
        sampling.generate(CFG, params, prompt, rng=key, max_new_tokens=1, top_p=1.5)
    assert isinstance(lmlib.init_cache(CFG, 2), lmlib.KVCache)
