"""The sampled-token reverse-KL estimator (jaxkd/losses/lm/sampled_token_reverse_kl.py) against a float64 NumPy
transcription of TRL's ``compute_sampled_token_self_distillation_loss`` and ``apply_importance_sampling_clipping``
(trl/experimental/sdft/loss_utils.py, the same in sdpo/loss_utils.py); the gradient against float64 central
finite differences of the surrogate with its detached log-ratio held fixed; the score-function identity
(the q-weighted sum over every possible sampled token is the exact reverse KL and its gradient), derandomized
with hypothesis; -inf tokens, the teacher and old log-probs as constants, argument checks.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxkd import losses as S
from tests.numpy_reference import np_log_softmax, rand_logits
from tests.test_loss_contract import central_differences

T = 1.4
B, L, V = 2, 3, 6
NONE = {"reduction": "none"}
logits = partial(rand_logits, shape=(B, L, V), scale=2.0)


def tokens_of(seed):
    return np.random.default_rng(seed).integers(0, V, size=(B, L)).astype(np.int32)


def np_trl(zs, zt, x, temperature, old=None, clip=None):
    """TRL: logits / T, selective_log_softmax at completion_ids, log_ratio.detach() * student_logps, then
    per_token_loss * min(exp(clamp(student_logps - old, -20, 20)), clip)."""
    lq = np.take_along_axis(np_log_softmax(zs, temperature), x[..., None], -1)[..., 0]
    lp = np.take_along_axis(np_log_softmax(zt, temperature), x[..., None], -1)[..., 0]
    loss = (lq - lp) * lq
    if clip is not None:
        loss = loss * np.minimum(np.exp(np.clip(lq - old, -20.0, 20.0)), clip)
    return loss, lq - lp


def test_matches_the_numpy_transcription_of_trl():
    zs, zt, x = logits(1), logits(2), tokens_of(3)
    want, log_ratio = np_trl(zs, zt, x, T)
    got = S.sampled_token_reverse_kl(zs, zt, x, temperature=T, **NONE)
    assert got.shape == (B, L) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(S.sampled_token_reverse_kl(zs, zt, x, temperature=T, form="estimate", **NONE),
                               log_ratio, rtol=1e-5, atol=1e-6)
    old = np.random.default_rng(4).normal(-1.5, 1.0, size=(B, L)).astype(np.float32)
    for clip in (0.5, 2.0, 1e3):
        want, _ = np_trl(zs, zt, x, T, old, clip)
        got = S.sampled_token_reverse_kl(zs, zt, x, temperature=T, old_log_probs=old, clip=clip, **NONE)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    mask = np.array([[1, 1, 0], [0, 1, 1]], bool)
    want, _ = np_trl(zs, zt, x, T)
    np.testing.assert_allclose(S.sampled_token_reverse_kl(zs, zt, x, temperature=T, mask=mask), want[mask].mean(),
                               rtol=1e-5)


@pytest.mark.parametrize("form,clip", [("policy_gradient", None), ("estimate", None), ("policy_gradient", 1.5)])
def test_gradient_is_the_policy_gradient_against_float64_finite_differences(form, clip):
    w = np.linspace(0.5, 1.5, B * L).reshape(B, L)
    x = tokens_of(7)
    with jax.enable_x64(True):
        zs, zt = logits(5).astype(np.float64), logits(6).astype(np.float64)
        old = np.full((B, L), -1.2) if clip else None
        kw = dict(temperature=T, form=form, old_log_probs=old, clip=clip, **NONE)
        loss = lambda s, t: jnp.sum(w * S.sampled_token_reverse_kl(s, t, x, **kw))  # noqa: E731
        grad_s, grad_t = jax.grad(loss, argnums=(0, 1))(zs, zt)
        assert grad_s.dtype == np.float64
        np.testing.assert_array_equal(grad_t, 0.0)  # the teacher is a constant
        # The reference: sg(r)·log q(x)·(importance weight), with r and the weight held at their base values.
        lq0 = jax.nn.log_softmax(zs / T)
        lq0 = np.take_along_axis(np.asarray(lq0), x[..., None], -1)[..., 0]
        lp0 = np.take_along_axis(np.asarray(jax.nn.log_softmax(zt / T)), x[..., None], -1)[..., 0]
        coef = w * (lq0 - lp0) * (np.minimum(np.exp(lq0 - old), clip) if clip else 1.0)

        def frozen(s):
            lq = jnp.take_along_axis(jax.nn.log_softmax(s / T), jnp.asarray(x)[..., None], -1)[..., 0]
            return jnp.sum(coef * lq)

        fd = central_differences(frozen, zs)
    np.testing.assert_allclose(grad_s, fd, rtol=1e-6, atol=1e-8)


def expectation_over_tokens(zs, zt, temperature):
    """Σ_x q(x)·l(x) and Σ_x q(x)·∇l(x) over every token x a single position could sample."""
    q = jax.nn.softmax(jnp.asarray(zs) / temperature)
    value, grad = 0.0, 0.0
    for v in range(zs.shape[-1]):
        x = np.full(zs.shape[:-1], v, np.int32)
        f = lambda s: jnp.sum(q[..., v] * S.sampled_token_reverse_kl(s, zt, x, temperature=temperature,  # noqa: E731,B023
                                                                       form="estimate", **NONE))
        val, g = jax.value_and_grad(f)(zs)
        value, grad = value + val, grad + g
    return value, grad


@settings(max_examples=10, derandomize=True, deadline=None)
@given(seed=st.integers(0, 2**16), temperature=st.sampled_from([0.7, 1.0, 2.0]))
def test_the_expectation_over_sampled_tokens_is_the_exact_reverse_kl_and_its_gradient(seed, temperature):
    zs, zt = rand_logits(seed, (4, V), 2.0), rand_logits(seed + 1, (4, V), 2.0)
    with jax.enable_x64(True):
        zs, zt = zs.astype(np.float64), zt.astype(np.float64)
        value, grad = expectation_over_tokens(zs, zt, temperature)
        exact = lambda s: jnp.sum(S.reverse_kl(s, zt, temperature=temperature, **NONE))  # noqa: E731
        np.testing.assert_allclose(value, exact(zs), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(grad, jax.grad(exact)(zs), rtol=1e-8, atol=1e-12)


def test_a_zero_probability_token_contributes_zero_with_zero_gradients():
    zs, zt, x = logits(8), logits(9), tokens_of(10)
    zt[0, 0, x[0, 0]] = -np.inf  # the teacher excludes the sampled token
    zs[1, 2, x[1, 2]] = -np.inf  # the student excludes it (it could not have sampled it)
    for form in ("policy_gradient", "estimate"):
        value = np.asarray(S.sampled_token_reverse_kl(zs, zt, x, form=form, **NONE))
        assert value[0, 0] == 0 and value[1, 2] == 0 and np.all(np.isfinite(value))
        g = jax.grad(lambda s: S.sampled_token_reverse_kl(s, zt, x, form=form))(zs)
        assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[0, 0] == 0) and np.all(np.asarray(g)[1, 2] == 0)
    zs[0, 1, 0] = np.nan  # NaN is not a mask: it propagates
    assert np.isnan(np.asarray(S.sampled_token_reverse_kl(zs, zt, x, **NONE))[0, 1])


def test_bfloat16_computes_in_float32_and_jit_gives_the_eager_value():
    zs, zt, x = logits(11), logits(12), tokens_of(13)
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    got = S.sampled_token_reverse_kl(bf(zs), bf(zt), x, **NONE)
    assert got.dtype == jnp.float32
    want = S.sampled_token_reverse_kl(np.asarray(bf(zs), np.float32), np.asarray(bf(zt), np.float32), x, **NONE)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jitted = jax.jit(lambda s, t, y: S.sampled_token_reverse_kl(s, t, y, temperature=T))(zs, zt, x)
    np.testing.assert_allclose(jitted, S.sampled_token_reverse_kl(zs, zt, x, temperature=T), rtol=1e-6)


def test_bad_input_raises():
    zs, zt, x = logits(14), logits(15), tokens_of(16)
    old = np.zeros((B, L), np.float32)
    for call, match in [
        (lambda: S.sampled_token_reverse_kl(zs, zt[..., :5], x), "number of classes"),
        (lambda: S.sampled_token_reverse_kl(zs, zt, x[:, :2]), "targets must have shape"),
        (lambda: S.sampled_token_reverse_kl(zs, zt, np.where(x == x, V, x)), "targets"),
        (lambda: S.sampled_token_reverse_kl(zs, zt, x, form="k3"), "form must be one of"),
        (lambda: S.sampled_token_reverse_kl(zs, zt, x, temperature=0.0), "temperature"),
        (lambda: S.sampled_token_reverse_kl(zs, zt, x, clip=2.0), "both old_log_probs and clip"),
        (lambda: S.sampled_token_reverse_kl(zs, zt, x, old_log_probs=old), "both old_log_probs and clip"),
        (lambda: S.sampled_token_reverse_kl(zs, zt, x, old_log_probs=old, clip=0.0), "clip"),
        (lambda: S.sampled_token_reverse_kl(zs, zt, x, old_log_probs=old[:, :1], clip=2.0), "old_log_probs must have"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
