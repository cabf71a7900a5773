"""Decoding-time fusion of several LMs (jaxkd/models/fusion.py): the KV-cached fused decoder against an
independent greedy loop over full forward passes with the proxy-tuning arithmetic written in NumPy, the
sampled tokens' log-probabilities against the teacher-forced fused distribution (dynamic logits fusion),
α = 0 proxy tuning against the large model alone, a custom combine against NumPy, and the
argument checks (vocabulary mismatch, max_new_tokens = 0, lengths, combine shapes, expert pairs)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from jaxkd import losses as L
from jaxkd.models import fusion
from jaxkd.models import lm as lmlib


V = 13
SMALL = lmlib.LMConfig(vocab_size=V, d_model=16, num_layers=1, num_heads=4, num_kv_heads=2, d_ff=24, max_len=8)
LARGE = lmlib.LMConfig(vocab_size=V, d_model=24, num_layers=1, num_heads=2, d_ff=32, max_len=8)
P, N = 3, 5  # P + N = max_len
PROMPT = np.array([[3, 7, 1], [0, 5, 9], [4, 2, 0]], np.int32)
# Row 0 all real, row 1 left-padded, row 2 right-padded (the continuation follows the gap).
PROMPT_MASK = np.array([[1, 1, 1], [0, 1, 1], [1, 1, 0]], bool)


@functools.cache
def _params(config, seed):
    """Random parameters of the model's shapes (NumPy draws: no init to compile). Large enough that the
    members' logits differ clearly (no near-ties for the greedy comparisons)."""
    shapes = jax.eval_shape(lmlib.TransformerLM(config).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if jax.tree_util.keystr(path).endswith("['scale']"):  # RMSNorm gains near 1
            return jnp.asarray(1.0 + 0.1 * rng.normal(size=leaf.shape), jnp.float32)
        return jnp.asarray(1.5 * rng.normal(size=leaf.shape) / np.sqrt(leaf.shape[0]), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, meta.unbox(shapes["params"]))


def _members(n=3):
    """large, small tuned (expert 1), small untuned, small expert 2."""
    return [(LARGE, _params(LARGE, 0)), (SMALL, _params(SMALL, 1)), (SMALL, _params(SMALL, 2)),
            (SMALL, _params(SMALL, 3))][:n]


@functools.cache
def _forward(config):
    return jax.jit(lambda params, tokens, mask: lmlib.TransformerLM(config).apply(
        {"params": params}, {"tokens": tokens, "mask": mask}))


def _all_logits(members, tokens, mask):
    return [np.asarray(_forward(c)(p, tokens, mask), np.float64) for c, p in members]


_log_probs = jax.jit(fusion.fused_log_probs, static_argnums=1)
_generate = jax.jit(fusion.fused_generate, static_argnums=1,
                    static_argnames=("max_new_tokens", "temperature", "top_k", "top_p", "eos_id"))


def test_greedy_fused_generation_equals_an_independent_loop_over_full_forwards():
    members, alpha = _members(3), 0.7
    gen = _generate(members, fusion.proxy_tuning(0, 1, 2, alpha=alpha), PROMPT, PROMPT_MASK,
                    rng=jax.random.key(0), max_new_tokens=N, temperature=0.0)
    # Reference: grow each row one token at a time; every step runs every member over the whole sequence
    # (fixed length P + N, not-yet-generated slots masked out) and reads the last real position.
    tokens = np.zeros((3, P + N), np.int32)
    tokens[:, :P] = PROMPT
    mask = np.zeros((3, P + N), bool)
    mask[:, :P] = PROMPT_MASK
    large_differs = False
    for s in range(N):
        large, tuned, untuned = _all_logits(members, tokens, mask)
        fused = large + alpha * (tuned - untuned)  # Liu et al. 2024, Eq. 1 in logits
        last = np.array([np.flatnonzero(row)[-1] for row in mask])
        step = fused[np.arange(3), last]
        tokens[:, P + s] = np.argmax(step, axis=-1)
        large_differs |= bool(np.any(np.argmax(large[np.arange(3), last], axis=-1) != tokens[:, P + s]))
        mask[:, P + s] = True
        margin = np.sort(step, axis=-1)[:, -1] - np.sort(step, axis=-1)[:, -2]
        assert margin.min() > 1e-3  # the reference's choice is not a float-rounding tie
    np.testing.assert_array_equal(gen.new_tokens, tokens[:, P:])
    np.testing.assert_array_equal(gen.tokens, tokens)
    np.testing.assert_array_equal(gen.mask, mask)
    np.testing.assert_array_equal(gen.log_probs, 0.0)
    # The large model alone would have chosen another token at some step: the small models' offset
    # matters, so the comparison above tests the combine, not just the large member.
    assert large_differs


def test_sampled_log_probs_equal_the_teacher_forced_fused_distribution():
    """Dynamic logits fusion with two experts: the KV-cached decoder's per-step distribution is the one
    fused_log_probs computes by full forward passes over the generated sequence."""
    members = _members(4)
    combine = fusion.dynamic_logits_fusion(0, [(1, 2), (3, 2)])
    prompt_mask = np.array([[1, 1, 1], [0, 1, 1], [0, 0, 1]], bool)  # left padding: new token i sits at P + i
    gen = _generate(members, combine, PROMPT, prompt_mask, rng=jax.random.key(7), max_new_tokens=N, temperature=1.0)
    log_p = np.asarray(_log_probs(members, combine, gen.tokens, gen.mask))
    scored = np.take_along_axis(log_p[:, P - 1:-1], np.asarray(gen.new_tokens)[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(gen.log_probs, scored, rtol=1e-4, atol=1e-4)
    # Independently of the fusion module: fused_log_probs is log_softmax(DLF(member logits)) per position.
    z = [jnp.asarray(x, jnp.float32) for x in _all_logits(members, gen.tokens, gen.mask)]
    want, alphas = L.dynamic_logits_fusion(z[0], jnp.stack([z[1], z[3]]), z[2])
    np.testing.assert_allclose(log_p, jax.nn.log_softmax(want), rtol=1e-4, atol=1e-4)
    assert np.any(np.asarray(alphas) != 0)  # the experts were used somewhere


def test_alpha_zero_proxy_tuning_is_the_large_model_alone():
    """At every position of a batch (padding included), the fused distribution is the large model's."""
    members = _members(3)
    tokens = np.array([[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 0, 1, 2, 3]], np.int32)
    mask = np.array([[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1]], bool)
    got = np.asarray(_log_probs(members, fusion.proxy_tuning(0, 1, 2, alpha=0.0), tokens, mask))
    large, tuned, untuned = _all_logits(members, tokens, mask)
    np.testing.assert_allclose(got, large - np.log(np.exp(large).sum(-1, keepdims=True)), rtol=1e-5, atol=1e-5)
    # The offset that α = 0 removes is not negligible here (its spread over the vocabulary changes the argmax).
    offset = tuned - untuned
    assert np.ptp(offset[mask], axis=-1).min() > 0.5  # (fully padded positions give every model zero logits)


def test_custom_combine_in_fused_log_probs_matches_numpy():
    members = _members(3)

    def ensemble(zs):  # the mean of the members' log-probabilities
        return sum(jax.nn.log_softmax(z) for z in zs) / len(zs)

    tokens = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]], np.int32)
    mask = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], bool)
    got = np.asarray(_log_probs(members, ensemble, tokens, mask))
    logs = [z - np.log(np.exp(z).sum(-1, keepdims=True)) for z in _all_logits(members, tokens, mask)]
    mean = sum(logs) / 3
    want = mean - np.log(np.exp(mean).sum(-1, keepdims=True))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_max_new_tokens_zero_returns_the_prompt():
    gen = fusion.fused_generate(_members(3), fusion.proxy_tuning(0, 1, 2), PROMPT, PROMPT_MASK,
                                rng=jax.random.key(0), max_new_tokens=0)
    np.testing.assert_array_equal(gen.tokens, PROMPT)
    np.testing.assert_array_equal(gen.mask, PROMPT_MASK)
    assert gen.new_tokens.shape == gen.new_mask.shape == gen.log_probs.shape == (3, 0)


def test_argument_checks():
    members = _members(3)
    other = lmlib.LMConfig(vocab_size=11, d_model=16, num_layers=1, num_heads=2, d_ff=16, max_len=8)
    with pytest.raises(ValueError, match=r"members\[0\] has vocab_size=13.*members\[2\] has vocab_size=11"):
        fusion.fused_generate(members[:2] + [(other, None)], fusion.proxy_tuning(0, 1, 2), PROMPT,
                              rng=jax.random.key(0), max_new_tokens=2)
    with pytest.raises(ValueError, match="vocab_size=11"):
        fusion.fused_log_probs([members[0], (other, None)], lambda zs: zs[0], PROMPT)
    with pytest.raises(ValueError, match=r"exceeds members\[0\]'s max_len=8"):
        fusion.fused_generate(members, fusion.proxy_tuning(0, 1, 2), PROMPT, rng=jax.random.key(0),
                              max_new_tokens=N + 1)
    with pytest.raises(ValueError, match="non-empty sequence"):
        fusion.fused_generate([], fusion.proxy_tuning(0, 1, 2), PROMPT, rng=jax.random.key(0), max_new_tokens=1)
    with pytest.raises(ValueError, match="eos_id"):
        fusion.fused_generate(members, fusion.proxy_tuning(0, 1, 2), PROMPT, rng=jax.random.key(0),
                              max_new_tokens=1, eos_id=V)
    with pytest.raises(ValueError, match=r"combine must return .* \[batch, vocab\] = \(3, 13\), got \(3, 5\)"):
        _generate(members, lambda zs: zs[0][:, :5], PROMPT, rng=jax.random.key(0), max_new_tokens=1)  # traced only
    with pytest.raises(ValueError, match=r"members\[3\].*only 3 members"):
        fusion.proxy_tuning(0, 3, 2)([jnp.zeros((2, V))] * 3)
    with pytest.raises(ValueError, match="same small model"):
        fusion.dynamic_logits_fusion(0, [(1, 2), (3, 1)])
    with pytest.raises(ValueError, match="experts"):
        fusion.dynamic_logits_fusion(0, [])
    with pytest.raises(ValueError, match="small_tuned"):
        fusion.proxy_tuning(0, -1, 2)
    # Combines are hashable and compare by value: a static jit argument compiles once per configuration.
    assert fusion.proxy_tuning(0, 1, 2, 0.5) == fusion.proxy_tuning(0, 1, 2, alpha=0.5)
    assert hash(fusion.dynamic_logits_fusion(0, [(1, 2)])) == hash(fusion.dynamic_logits_fusion(0, [[1, 2]]))
