"""Tests for the decoder-only transformer LM (jaxkd.models.lm): a NumPy forward pass written from the
papers' formulas, the KV cache against the full forward, causality, padding and positions, logical axis
names, parameter counts, dtypes and input errors.

Compiles dominate the cost: one tiny config, one jitted forward per input structure, shared fixtures.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from jaxkd.models import lm as lmlib
from jaxkd.models.base import Model

CFG = lmlib.LMConfig(vocab_size=13, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=24, max_len=8)
B, T = 3, 6


def _key(seed=0):
    return jax.random.key(seed, impl="rbg")  # compiles faster than threefry on CPU; any weights will do


def _tokens(seed=0, shape=(B, T)):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, shape).astype(np.int32)


# Row 0 all real, row 1 left-padded, row 2 with a gap (a right-padded prompt continued after it).
MASK = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1]], bool)


@functools.cache
def _setup(config=CFG):
    """``(model, boxed variables, params, jitted forward(params, tokens, mask) -> (logits, features))``."""
    model = lmlib.lm(config)
    x = {"tokens": jnp.asarray(_tokens()), "mask": jnp.asarray(MASK)}
    boxed = jax.jit(model.init)(_key(), x)
    params = meta.unbox(boxed["params"])

    @jax.jit
    def forward(params, tokens, mask):
        out = model.apply({"params": params}, {"tokens": tokens, "mask": mask}, train=False)
        return out.logits, out.features

    return model, boxed, params, forward


# ----- NumPy reference (float64), from the formulas: RMSNorm, RoPE as complex rotation, GQA, SwiGLU -----

def _np_forward(params, config, tokens, mask, positions=None):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    d, h, k, hd = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
    mask = np.asarray(mask, bool)
    if positions is None:
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    theta = config.rope_base ** (-2.0 * np.arange(hd // 2) / hd)
    rot = np.exp(1j * positions[..., None] * theta)  # [B, T, hd/2]

    def rope(x):  # feature i and i + hd/2 are the real and imaginary parts of one rotated pair
        z = (x[..., : hd // 2] + 1j * x[..., hd // 2:]) * rot[:, :, None, :]
        return np.concatenate([z.real, z.imag], axis=-1)

    def rms(x, scale):
        return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + config.norm_eps) * scale

    x = p["embedding"][np.asarray(tokens)] * mask[..., None]
    n = x.shape[1]
    allowed = mask[:, None, :] & np.tril(np.ones((n, n), bool))[None]  # [B, query, key]
    for i in range(config.num_layers):
        blk = p[f"block_{i}"]
        y = rms(x, blk["attention_norm"]["scale"])
        q = rope(np.einsum("btd,dhk->bthk", y, blk["attention"]["query"]))
        kk = rope(np.einsum("btd,dhk->bthk", y, blk["attention"]["key"]))
        v = np.einsum("btd,dhk->bthk", y, blk["attention"]["value"])
        out = np.zeros_like(q)
        for head in range(h):
            j = head // (h // k)  # the key/value head this query head shares
            s = np.einsum("bqd,bkd->bqk", q[:, :, head], kk[:, :, j]) / np.sqrt(hd)
            s = np.where(allowed, s, -np.inf)
            top = s.max(-1, keepdims=True)
            w = np.exp(s - np.where(np.isfinite(top), top, 0.0))
            total = w.sum(-1, keepdims=True)
            w = w / np.where(total > 0, total, 1.0)  # a row with no key: zero output
            out[:, :, head] = np.einsum("bqk,bkd->bqd", w, v[:, :, j])
        x = x + np.einsum("bthk,hkd->btd", out, blk["attention"]["out"])
        y = rms(x, blk["mlp_norm"]["scale"])
        g = y @ blk["mlp"]["gate"]
        x = x + ((g / (1 + np.exp(-g))) * (y @ blk["mlp"]["up"])) @ blk["mlp"]["down"]
    hidden = rms(x, p["final_norm"]["scale"])
    head = p["embedding"].T if config.tie_embeddings else p["head"]
    return hidden @ head


def test_forward_matches_numpy_reference():
    _, _, params, forward = _setup()
    tokens = _tokens(1)
    logits, features = forward(params, tokens, MASK)
    assert logits.shape == (B, T, CFG.vocab_size) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, _np_forward(params, CFG, tokens, MASK), rtol=1e-4, atol=1e-5)
    assert sorted(features) == ["block0", "block1", "hidden"]
    assert all(f.shape == (B, T, CFG.d_model) for f in features.values())


def test_output_projection_and_hidden_feature_give_the_logits():
    _, _, params, forward = _setup()
    logits, features = forward(params, _tokens(2), MASK)
    proj = lmlib.output_projection(params, CFG)
    assert proj.shape == (CFG.d_model, CFG.vocab_size)
    np.testing.assert_allclose(features["hidden"] @ proj, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(proj, params["embedding"].T)  # tied


def test_untied_head_and_parameter_counts():
    untied = dataclasses.replace(CFG, tie_embeddings=False)
    _, boxed, params, forward = _setup(untied)
    assert params["head"].shape == (CFG.d_model, CFG.vocab_size)
    tokens = _tokens(3)
    logits, features = forward(params, tokens, MASK)
    proj = lmlib.output_projection(boxed, untied)  # a boxed variables dict is accepted too
    np.testing.assert_array_equal(proj, params["head"])
    np.testing.assert_allclose(features["hidden"] @ proj, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, _np_forward(params, untied, tokens, MASK), rtol=1e-4, atol=1e-5)
    tied_params = _setup()[2]
    assert "head" not in tied_params
    count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))  # noqa: E731
    assert count(tied_params) == CFG.num_params
    assert count(params) == untied.num_params == CFG.num_params + CFG.d_model * CFG.vocab_size


@pytest.mark.parametrize("kv_heads", [1, 4])  # multi-query and plain multi-head attention
def test_num_params_formula_matches_the_parameters(kv_heads):
    config = dataclasses.replace(CFG, num_kv_heads=kv_heads)
    shapes = jax.eval_shape(lmlib.lm(config).init, _key(), {"tokens": jax.ShapeDtypeStruct((1, 2), jnp.int32)})
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(meta.unbox(shapes))) == config.num_params


def test_num_params_of_the_1b_preset_without_memory():
    config = lmlib.lm_config("lm_1b", vocab_size=32000, max_len=16)
    shapes = jax.eval_shape(lmlib.lm(config).init, _key(), {"tokens": jax.ShapeDtypeStruct((1, 1), jnp.int32)})
    actual = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(meta.unbox(shapes)))
    assert actual == config.num_params
    # TinyLlama-1.1B (same shape, 32000 tokens, untied) has 1,100,048,384 parameters.
    assert actual == 1_100_048_384


def test_preset_names_give_the_non_embedding_size():
    nominal = {"lm_1m": 1e6, "lm_4m": 4e6, "lm_25m": 25e6, "lm_125m": 125e6, "lm_1b": 1e9, "lm_7b": 7e9}
    assert set(nominal) == set(lmlib.LM_PRESETS)
    for name, size in nominal.items():
        config = lmlib.lm_config(name, vocab_size=32000)
        assert 0.7 * size <= config.num_non_embedding_params <= 1.3 * size, name
    # LLaMA-7B: 6,738,415,616 parameters (32000 tokens, untied).
    assert lmlib.lm_config("lm_7b", vocab_size=32000).num_params == 6_738_415_616
    with pytest.raises(ValueError, match="unknown LM preset"):
        lmlib.lm_config("lm_3b", vocab_size=100)


def test_every_parameter_has_logical_axis_names():
    _, boxed, params, _ = _setup()
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, meta.AxisMetadata))
    assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
    specs = nn.get_partition_spec(boxed["params"])
    for (path, spec), array in zip(jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                                   jax.tree.leaves(params)):
        assert len(spec) == array.ndim and all(name in lmlib.LOGICAL_AXES for name in spec), (path, spec)
    rules = dict(lmlib.lm_logical_rules().logical)
    assert set(rules) == set(lmlib.LOGICAL_AXES)
    to_mesh = lambda names: nn.logical_to_mesh_axes(names, tuple(rules.items()))  # noqa: E731
    P = jax.sharding.PartitionSpec
    assert to_mesh(("vocab", "embed")) == P("tensor", "fsdp")
    assert to_mesh(("embed", "mlp")) == P("fsdp", "tensor")
    assert to_mesh(("embed", "heads", "head_dim")) == P("fsdp", "tensor", None)
    assert to_mesh(("norm",)) == P(None)


def test_kv_cache_prefill_then_decode_equals_full_forward():
    _, _, params, forward = _setup()
    tokens = _tokens(4)
    full, _ = forward(params, tokens, MASK)
    prefix = 3
    prefill = jax.jit(lmlib.prefill, static_argnames="cache_len")
    logits, cache = prefill(params, CFG, tokens[:, :prefix], MASK[:, :prefix], cache_len=T)
    assert cache.keys.shape == (CFG.num_layers, B, T, CFG.num_kv_heads, CFG.head_dim)
    np.testing.assert_allclose(logits, full[:, :prefix], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache.position, MASK[:, :prefix].sum(1))
    step = jax.jit(lmlib.decode_step)  # LMConfig is a static pytree: a plain jit argument
    for t in range(prefix, T):  # the rest of MASK is all real, as decoding feeds real tokens
        logits, cache = step(params, CFG, tokens[:, t], cache)
        np.testing.assert_allclose(logits, full[:, t], rtol=1e-5, atol=1e-5, err_msg=f"position {t}")
    assert int(cache.index) == T
    np.testing.assert_array_equal(cache.mask, MASK)


def test_causality():
    _, _, params, forward = _setup()
    tokens = _tokens(5)
    ones = np.ones((B, T), bool)
    base, _ = forward(params, tokens, ones)
    for t in range(T - 1):
        changed = tokens.copy()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1) % CFG.vocab_size
        logits, _ = forward(params, changed, ones)
        np.testing.assert_array_equal(logits[:, : t + 1], base[:, : t + 1])
        assert np.abs(logits[:, t + 1] - base[:, t + 1]).max() > 1e-4  # the change is seen


def test_padded_tokens_change_nothing_and_positions_count_real_tokens():
    _, _, params, forward = _setup()
    tokens = _tokens(6)
    base, _ = forward(params, tokens, MASK)
    garbage = np.where(MASK, tokens, np.array([[99, -5, 7, 0, 1, 2]] * B, np.int32))  # out-of-range ids too
    logits, _ = forward(params, garbage, MASK)
    assert np.all(np.isfinite(logits))
    np.testing.assert_array_equal(np.asarray(logits)[MASK], np.asarray(base)[MASK])
    # Row 1 is [pad, pad, a, b, c, d]: its logits are those of [a, b, c, d] unpadded; row 2 is
    # [a, b, pad, c, d, e] (a right-padded prompt continued): its logits are those of [a, b, c, d, e], which
    # needs c at position 2 (cumsum(mask) - 1), not at its index 3. (A left-padding offset alone would not
    # show: rotary scores depend on position differences only.)
    unpadded = np.stack([tokens[0], np.roll(tokens[1], -2), np.delete(tokens[2], 2).tolist() + [0]])
    ref, _ = forward(params, unpadded, np.ones((B, T), bool))
    np.testing.assert_allclose(base[1, 2:], ref[1, :4], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(base[2, [0, 1, 3, 4, 5]], ref[2, :5], rtol=1e-5, atol=1e-5)


def test_fully_padded_row_is_finite_in_value_and_gradient():
    _, _, params, _ = _setup()
    model = lmlib.lm(CFG)
    mask = MASK.copy()
    mask[2] = False

    @jax.jit
    def loss_and_grad(params, tokens):
        def loss(params):
            logits = model.apply({"params": params}, {"tokens": tokens, "mask": mask}, train=False).logits
            return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0)), logits
        return jax.value_and_grad(loss, has_aux=True)(params)

    (value, logits), grads = loss_and_grad(params, _tokens(7))
    assert np.isfinite(value) and np.all(np.isfinite(logits))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_explicit_positions_override_and_rope_is_relative():
    model, _, params, _ = _setup()
    tokens = _tokens(8)
    ones = np.ones((B, T), bool)

    @jax.jit
    def forward(params, positions):
        return model.apply({"params": params}, {"tokens": tokens, "mask": ones, "positions": positions},
                           train=False).logits

    default = np.broadcast_to(np.arange(T), (B, T)).astype(np.int32)
    base = forward(params, default)
    np.testing.assert_allclose(base, _np_forward(params, CFG, tokens, ones), rtol=1e-4, atol=1e-5)
    # Rotary embeddings only see position differences: a constant shift changes nothing.
    np.testing.assert_allclose(forward(params, default + 5), base, rtol=1e-4, atol=1e-4)
    spread = default * 3
    np.testing.assert_allclose(forward(params, spread), _np_forward(params, CFG, tokens, ones, spread),
                               rtol=1e-4, atol=1e-5)
    assert np.abs(forward(params, spread) - base).max() > 1e-3


def test_bfloat16_compute_gives_float32_logits_close_to_float32():
    _, _, params, forward = _setup()
    bf16 = dataclasses.replace(CFG, dtype=jnp.bfloat16)
    model = lmlib.lm(bf16)
    tokens = _tokens(9)
    out = jax.jit(lambda p: model.apply({"params": p}, {"tokens": tokens, "mask": MASK}, train=False))(params)
    assert out.logits.dtype == jnp.float32
    assert out.features["hidden"].dtype == jnp.bfloat16
    ref, _ = forward(params, tokens, MASK)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out.logits, ref, atol=0.05 * scale)


def test_model_contract():
    model = lmlib.lm(CFG, name="student")
    assert isinstance(model, Model) and model.name == "student"
    _, _, params, forward = _setup()
    tokens = _tokens(10)
    out = jax.jit(lambda p: lmlib.lm(CFG).apply({"params": p}, tokens, train=True))(params)  # bare tokens, no mask
    assert out.model_state == {}
    np.testing.assert_allclose(out.logits, forward(params, tokens, np.ones((B, T), bool))[0], rtol=1e-6, atol=1e-6)


def test_input_errors():
    model, boxed, _, _ = _setup()
    variables = {"params": meta.unbox(boxed["params"])}
    apply = functools.partial(jax.eval_shape, lambda x: model.apply(variables, x, train=False))
    with pytest.raises(ValueError, match=r"sequence length 9 exceeds max_len=8"):
        apply({"tokens": jax.ShapeDtypeStruct((1, 9), jnp.int32)})
    with pytest.raises(ValueError, match="integer ids.*float32"):
        apply({"tokens": jax.ShapeDtypeStruct((1, 4), jnp.float32)})
    with pytest.raises(ValueError, match="unknown: \\['attention_mask'\\]"):
        apply({"tokens": jax.ShapeDtypeStruct((1, 4), jnp.int32), "attention_mask": jax.ShapeDtypeStruct((1, 4), bool)})
    with pytest.raises(ValueError, match="mask must have the tokens' shape"):
        apply({"tokens": jax.ShapeDtypeStruct((1, 4), jnp.int32), "mask": jax.ShapeDtypeStruct((1, 3), bool)})
    with pytest.raises(ValueError, match="exceeds the model's max_len=8"):
        lmlib.init_cache(CFG, 1, max_len=9)
    with pytest.raises(ValueError, match="does not fit cache_len=2"):
        lmlib.prefill(variables, CFG, np.zeros((1, 3), np.int32), cache_len=2)


@pytest.mark.parametrize("changes, match", [
    (dict(d_model=18), "num_heads must divide d_model"),
    (dict(num_kv_heads=3), "num_kv_heads must divide num_heads"),
    (dict(d_model=12, num_heads=4), "must be even"),
    (dict(num_layers=0), "num_layers must be an integer >= 1"),
    (dict(vocab_size=2.5), "vocab_size must be an integer"),
    (dict(dtype=jnp.int32), "dtype must be a floating dtype"),
])
def test_config_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(CFG, **changes)
