"""jaxkd.losses.fused_linear_divergence: the token divergences fused with the output projection.

Reference: the same jaxkd divergence on the materialized logits ``hidden @ head`` (value and gradients
in float32 to 1e-5 relative, for every divergence, with a mask, weights and a ragged last chunk), a
float64 NumPy forward KL written from the formula, and float64 central finite differences. Also: the
teacher gets zero gradients, fully masked batches give 0 with zero gradients, masked tokens' hidden
states do not matter, ``normalizer`` (gradient accumulation), traced hyper-parameters, bfloat16, chunk
size invariance, argument errors, and (compile only) the temporary memory of the value-and-grad.
No timing is asserted here; benchmarks/fused_linear.py measures time and memory at full size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import losses
from tests.test_loss_contract import central_differences


N, D, DT, V = 7, 3, 4, 6  # 7 tokens in chunks of 3: the last chunk is ragged (one real row, two padded)
CHUNK = 3
T = 1.5
DIVERGENCES = {  # name -> its hyper-parameter at a non-default value
    "forward_kl": {},
    "reverse_kl": {},
    "js_divergence": {},
    "generalized_jsd": {"beta": 0.3},
    "skew_kl": {"alpha": 0.2},
    "skew_reverse_kl": {"alpha": 0.25},
    "total_variation": {},
}
MASK = np.array([1, 1, 0, 1, 1, 0, 1], bool)  # a masked token in the first and second chunk
WEIGHTS = np.linspace(0.5, 1.5, N).astype(np.float32)
COEF = np.linspace(-1.0, 2.0, N).astype(np.float32)  # a per-token cotangent for reduction="none"


def make_inputs(seed=0, dtype=np.float32, n=N):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n, D)).astype(dtype),
        rng.normal(size=(D, V)).astype(dtype),
        rng.normal(size=(n, DT)).astype(dtype),
        rng.normal(size=(DT, V)).astype(dtype),
    )


def fused(hs, ws, ht, wt, name, **kw):
    kw = {"divergence": name, "temperature": T, "chunk_size": CHUNK, **DIVERGENCES[name], **kw}
    return losses.fused_linear_divergence(hs, ws, ht, wt, **kw)


def naive(hs, ws, ht, wt, name, **kw):
    return getattr(losses, name)(hs @ ws, ht @ wt, temperature=T, **DIVERGENCES[name], **kw)


@functools.cache  # one compiled program per (loss, divergence, reduction), shared by the tests
def value_and_grads(loss, name, reduction):
    """The compiled ``(hs, ws, ht, wt, mask, weights) ->`` value and (hidden, head) gradients of the
    loss; for ``reduction="none"``, of ``Σ COEF·l`` (a per-token cotangent), returning the per-token
    values as the value."""

    def run(hs, ws, ht, wt, mask, weights):
        per_token = lambda a, b: loss(a, b, ht, wt, name, mask=mask, weights=weights, reduction=reduction)  # noqa: E731
        if reduction != "none":
            return jax.value_and_grad(per_token, argnums=(0, 1))(hs, ws)
        f = lambda a, b: (jnp.sum(COEF * per_token(a, b)), per_token(a, b))  # noqa: E731
        (_, values), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(hs, ws)
        return values, grads

    return jax.jit(run)


def assert_close(actual, expected, rtol=1e-5, err_msg=""):
    """Elementwise to ``rtol``, with an absolute floor of ``rtol`` times the largest reference entry
    (entries that cancel to ~0 carry the rounding of their larger neighbours)."""
    expected = np.asarray(expected)
    atol = rtol * float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=atol, err_msg=err_msg)


def check_against_materialized(name, reduction, seed=0):
    args = make_inputs(seed)
    run = lambda loss: value_and_grads(loss, name, reduction)(*args, MASK, WEIGHTS)  # noqa: E731
    (v_got, g_got), (v_want, g_want) = run(fused), run(naive)
    assert v_got.dtype == jnp.float32 and v_got.shape == v_want.shape
    assert np.all(np.asarray(v_want)[MASK] > 0) if reduction == "none" else float(v_want) > 0
    assert_close(v_got, v_want, err_msg=f"{name} {reduction} value")
    for arg, a, b in zip(("hidden", "head"), g_got, g_want):
        assert a.shape == b.shape and a.dtype == jnp.float32
        assert_close(a, b, err_msg=f"{name} {reduction} d/d{arg}")
    return v_got


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_mean_and_gradients_equal_the_materialized_divergence(name):
    check_against_materialized(name, "mean")


@pytest.mark.parametrize("name, reduction", [("reverse_kl", "sum"), ("generalized_jsd", "none")])
def test_sum_and_per_token_values_equal_the_materialized_divergence(name, reduction):
    values = check_against_materialized(name, reduction)
    if reduction == "none":
        assert values.shape == (N,) and np.all(np.asarray(values)[~MASK] == 0)


def test_forward_kl_against_numpy_formula():
    hs, ws, ht, wt = make_inputs(seed=3)
    zs, zt = hs.astype(np.float64) @ ws / T, ht.astype(np.float64) @ wt / T
    log_ps = zs - np.log(np.exp(zs).sum(-1, keepdims=True))
    log_pt = zt - np.log(np.exp(zt).sum(-1, keepdims=True))
    per_token = (np.exp(log_pt) * (log_pt - log_ps)).sum(-1)
    w = MASK * WEIGHTS
    expected = (w * per_token).sum() / w.sum()
    got, _ = value_and_grads(fused, "forward_kl", "mean")(hs, ws, ht, wt, MASK, WEIGHTS)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_gradients_match_float64_finite_differences(name="skew_reverse_kl"):
    # skew reverse KL: the gradient flows through p_S and through the mixture (the richest chain rule).
    with jax.enable_x64(True):
        hs, ws, ht, wt = make_inputs(seed=1, dtype=np.float64)
        f = lambda a, b: fused(a, b, ht, wt, name, mask=MASK, weights=WEIGHTS)  # noqa: E731
        g_hidden, g_head = jax.jit(jax.grad(f, argnums=(0, 1)))(hs, ws)
        assert g_hidden.dtype == np.float64 and g_head.dtype == np.float64
        fd_hidden = central_differences(lambda a: f(a, ws), hs)
        fd_head = central_differences(lambda b: f(hs, b), ws)
    np.testing.assert_allclose(g_hidden, fd_hidden, rtol=1e-6, atol=1e-8, err_msg=f"{name} d/dhidden")
    np.testing.assert_allclose(g_head, fd_head, rtol=1e-6, atol=1e-8, err_msg=f"{name} d/dhead")
    assert np.all(np.asarray(g_hidden)[~MASK] == 0)  # masked tokens get no gradient


def test_teacher_is_a_constant():
    hs, ws, ht, wt = make_inputs(seed=2)

    def f(*args):  # both code paths: the custom VJP ("mean") and the rematerialized scan ("none")
        per_token = fused(*args, "generalized_jsd", mask=MASK, reduction="none")
        return fused(*args, "generalized_jsd", mask=MASK) + jnp.sum(COEF * per_token)

    # generalized_jsd's value depends on the teacher logits, so a nonzero teacher gradient would show.
    grads = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(hs, ws, ht, wt)
    assert np.any(np.asarray(grads[0]) != 0) and np.any(np.asarray(grads[1]) != 0)
    for g, x in zip(grads[2:], (ht, wt)):
        assert g.shape == x.shape
        np.testing.assert_array_equal(g, np.zeros_like(x))


def test_everything_masked_gives_zero_and_zero_gradients():
    args = make_inputs(seed=4)
    value, grads = value_and_grads(fused, "reverse_kl", "mean")(*args, np.zeros(N, bool), WEIGHTS)
    assert float(value) == 0.0
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)


def test_masked_tokens_do_not_matter():
    hs, ws, ht, wt = make_inputs(seed=5)
    rng = np.random.default_rng(6)
    garbage_s, garbage_t = hs.copy(), ht.copy()
    garbage_s[~MASK] = 1e3 * rng.normal(size=(int((~MASK).sum()), D))
    garbage_t[~MASK] = 1e3 * rng.normal(size=(int((~MASK).sum()), DT))
    f = value_and_grads(fused, "js_divergence", "mean")
    v1, (gh1, gw1) = f(hs, ws, ht, wt, MASK, WEIGHTS)
    v2, (gh2, gw2) = f(garbage_s, ws, garbage_t, wt, MASK, WEIGHTS)
    assert float(v1) == float(v2)
    np.testing.assert_array_equal(gw1, gw2)
    np.testing.assert_array_equal(gh1, gh2)
    np.testing.assert_array_equal(np.asarray(gh1)[~MASK], 0.0)


def test_normalizer_accumulates_to_the_global_mean():
    """Two micro-batches of 4 tokens with different unmasked counts (3 and 1), each divided by the global
    count, sum to the mean over all 8 tokens — value and gradients — where the mean of the two
    micro-batch means would not."""
    hs, ws, ht, wt = make_inputs(seed=7, n=8)
    mask = np.array([1, 1, 0, 1, 0, 0, 1, 0], bool)
    f = lambda a, b, t, m, normalizer: fused(a, b, t, wt, "skew_kl", mask=m, normalizer=normalizer)  # noqa: E731
    vg = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    v_full, (gh_full, gw_full) = vg(hs, ws, ht, mask, None)
    count = float(mask.sum())
    v1, (gh1, gw1) = vg(hs[:4], ws, ht[:4], mask[:4], count)
    v2, (gh2, gw2) = vg(hs[4:], ws, ht[4:], mask[4:], count)
    assert_close(v1 + v2, v_full)
    assert_close(gw1 + gw2, gw_full)
    assert_close(np.concatenate([gh1, gh2]), gh_full)
    value, grads = vg(hs[:4], ws, ht[:4], mask[:4], 0.0)  # a zero normalizer gives 0, as in reduce_loss
    assert float(value) == 0.0 and all(np.all(np.asarray(g) == 0) for g in grads)
    own_means = v1 * count / mask[:4].sum() + v2 * count / mask[4:].sum()
    assert abs(float(own_means) / 2 - float(v_full)) > 1e-3  # averaging micro-batch means differs


def test_chunk_size_does_not_change_the_result():
    args = make_inputs(seed=8)
    reference, _ = value_and_grads(fused, "total_variation", "mean")(*args, MASK, WEIGHTS)  # chunks of 3
    for chunk in (1, 100):  # 7 chunks of one token; one chunk of all 7 (clamped)
        f = jax.jit(lambda *a: fused(*a, "total_variation", mask=MASK, weights=WEIGHTS, chunk_size=chunk))  # noqa: B023
        np.testing.assert_allclose(float(f(*args)), float(reference), rtol=1e-6)


def test_traced_hyper_parameters_equal_static_ones():
    hs, ws, ht, wt = make_inputs(seed=9)
    static = fused(hs, ws, ht, wt, "generalized_jsd", mask=MASK)
    traced = jax.jit(lambda t, b: losses.fused_linear_divergence(
        hs, ws, ht, wt, divergence="generalized_jsd", temperature=t, beta=b, mask=MASK, chunk_size=CHUNK))
    assert_close(traced(T, DIVERGENCES["generalized_jsd"]["beta"]), static)


def test_bfloat16_computes_in_float32_and_returns_input_dtype_gradients():
    args16 = [jnp.asarray(x, jnp.bfloat16) for x in make_inputs(seed=10)]
    args32 = [x.astype(jnp.float32) for x in args16]  # the same (rounded) values in float32
    vg = value_and_grads(fused, "forward_kl", "mean")  # one program, traced once per dtype
    (v16, g16), (v32, g32) = vg(*args16, MASK, WEIGHTS), vg(*args32, MASK, WEIGHTS)
    assert v16.dtype == jnp.float32
    assert_close(v16, v32)
    for a, b, x in zip(g16, g32, args16):
        assert a.dtype == jnp.bfloat16 and a.shape == x.shape
        assert_close(a.astype(jnp.float32), b, rtol=1e-2)  # one bfloat16 rounding of the float32 gradient


def test_bad_arguments_raise():
    hs, ws, ht, wt = make_inputs()
    call = lambda *a, **kw: losses.fused_linear_divergence(*a, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"divergence must be one of .*forward_kl.*total_variation"):
        call(hs, ws, ht, wt, divergence="kl")
    with pytest.raises(ValueError, match=r"vocabulary size: student_head has 6, teacher_head has 5"):
        call(hs, ws, ht, wt[:, :5])
    dimension_mismatch = r"{0}_hidden's dimension {1} does not match {0}_head's input dimension {2}"
    with pytest.raises(ValueError, match=dimension_mismatch.format("student", 3, 4)):
        call(hs, wt, ht, wt)
    with pytest.raises(ValueError, match=dimension_mismatch.format("teacher", 4, 3)):
        call(hs, ws, ht, ws)
    with pytest.raises(ValueError, match=r"same number of tokens, got 7 and 6"):
        call(hs, ws, ht[:6], wt)
    with pytest.raises(ValueError, match=r"student_hidden must be \[tokens, dim\]"):
        call(hs[None], ws, ht, wt)
    with pytest.raises(ValueError, match=r"beta is a hyper-parameter of \['generalized_jsd'\]"):
        call(hs, ws, ht, wt, divergence="forward_kl", beta=0.5)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        call(hs, ws, ht, wt, divergence="skew_kl", alpha=1.5)
    with pytest.raises(ValueError, match=r"temperature"):
        call(hs, ws, ht, wt, temperature=0.0)
    with pytest.raises(ValueError, match=r"chunk_size must be an integer >= 1"):
        call(hs, ws, ht, wt, chunk_size=0)
    with pytest.raises(ValueError, match=r"reduction must be"):
        call(hs, ws, ht, wt, reduction="max")
    with pytest.raises(ValueError, match=r"mask must have the examples' shape"):
        call(hs, ws, ht, wt, mask=MASK[:5])
    with pytest.raises(ValueError, match=r"normalizer must be a scalar"):
        call(hs, ws, ht, wt, normalizer=np.ones(2))


def test_compiled_temporary_memory_is_at_most_a_quarter_of_the_materialized_one():
    """XLA's memory analysis of the compiled value-and-grad (compile only, nothing runs), at a size
    where the logits dominate: 4096 tokens, vocabulary 2048, the default chunk size."""
    n, d, v = 4096, 32, 2048
    spec = jax.ShapeDtypeStruct
    args = (spec((n, d), jnp.float32), spec((d, v), jnp.float32), spec((n, d), jnp.float32),
            spec((d, v), jnp.float32), spec((n,), jnp.bool_))

    def temp_bytes(loss):
        program = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
        return program.memory_analysis().temp_size_in_bytes

    naive_bytes = temp_bytes(lambda hs, ws, ht, wt, m: losses.reverse_kl(hs @ ws, ht @ wt, mask=m))
    fused_bytes = temp_bytes(lambda hs, ws, ht, wt, m: losses.fused_linear_divergence(
        hs, ws, ht, wt, divergence="reverse_kl", mask=m))
    assert naive_bytes >= 4 * n * v * 4  # the materialized program holds several [N, V] float32 arrays
    assert fused_bytes <= naive_bytes / 4, (fused_bytes, naive_bytes)


# ----- logit soft-capping (Gemma's final_logit_softcapping) -----

CAP = 1.3  # small enough that tanh bends the logits of make_inputs (|z| up to ~4)


def capped_naive(hs, ws, ht, wt, name, **kw):
    cap = lambda z: CAP * jnp.tanh(z / CAP)  # noqa: E731
    return getattr(losses, name)(cap(hs @ ws), cap(ht @ wt), temperature=T, **DIVERGENCES[name], **kw)


@pytest.mark.parametrize("name, reduction", [("forward_kl", "mean"), ("generalized_jsd", "mean"),
                                             ("reverse_kl", "sum"), ("skew_kl", "none")])
def test_softcap_equals_the_unfused_divergence_of_the_capped_logits(name, reduction):
    args = make_inputs(seed=5)
    capped = functools.partial(fused, softcap=CAP)
    run = lambda loss: value_and_grads(loss, name, reduction)(*args, MASK, WEIGHTS)  # noqa: E731
    (v_got, g_got), (v_want, g_want) = run(capped), run(capped_naive)
    assert_close(v_got, v_want, err_msg=f"{name} {reduction} value")
    for arg, a, b in zip(("hidden", "head"), g_got, g_want):
        assert_close(a, b, err_msg=f"{name} {reduction} d/d{arg}")
    # The cap changes the loss (it is not a no-op at these logits).
    (v_plain, _) = run(fused)
    assert not np.allclose(np.asarray(v_plain), np.asarray(v_got), rtol=1e-3)


def test_softcap_against_numpy_and_float64_finite_differences():
    hs, ws, ht, wt = make_inputs(seed=6)
    cap = lambda z: CAP * np.tanh(z / CAP)  # noqa: E731
    zs, zt = cap(hs.astype(np.float64) @ ws) / T, cap(ht.astype(np.float64) @ wt) / T
    log_ps = zs - np.log(np.exp(zs).sum(-1, keepdims=True))
    log_pt = zt - np.log(np.exp(zt).sum(-1, keepdims=True))
    w = MASK * WEIGHTS
    expected = (w * (np.exp(log_pt) * (log_pt - log_ps)).sum(-1)).sum() / w.sum()
    got = fused(hs, ws, ht, wt, "forward_kl", softcap=CAP, mask=MASK, weights=WEIGHTS)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    with jax.enable_x64(True):
        hs, ws, ht, wt = make_inputs(seed=6, dtype=np.float64)
        f = lambda a, b: fused(a, b, ht, wt, "reverse_kl", softcap=CAP, mask=MASK, weights=WEIGHTS)  # noqa: E731
        g_hidden, g_head = jax.jit(jax.grad(f, argnums=(0, 1)))(hs, ws)
        fd_hidden = central_differences(lambda a: f(a, ws), hs)
        fd_head = central_differences(lambda b: f(hs, b), ws)
    np.testing.assert_allclose(g_hidden, fd_hidden, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(g_head, fd_head, rtol=1e-6, atol=1e-8)


def test_bad_softcap_raises():
    hs, ws, ht, wt = make_inputs()
    for bad in (0.0, -1.0, float("inf"), "30"):
        with pytest.raises(ValueError, match="softcap"):
            losses.fused_linear_divergence(hs, ws, ht, wt, softcap=bad)
    with pytest.raises(ValueError, match="softcap must be a concrete number"):
        jax.jit(lambda c: losses.fused_linear_divergence(hs, ws, ht, wt, softcap=c))(30.0)
