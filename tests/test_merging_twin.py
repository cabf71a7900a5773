"""Twin-Merging (jaxkd.merging.twin_merging) against NumPy: the shared merge, the truncated SVD of the exclusive
knowledge, the router's softmax, the per-input merged parameters and the per-example forward pass."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd.merging.twin_merging import (LowRank, TwinRouter, TwinVectors, train_twin_router, twin_apply,
                                        twin_compress, twin_merged_params, twin_router_features, twin_router_loss,
                                        twin_router_weights)
from jaxkd.models.base import Model, Outputs, from_linen

SCALING = 0.3


def _params(rng, shapes):
    return {name: {k: rng.normal(size=s).astype(np.float32) for k, s in leaves.items()}
            for name, leaves in shapes.items()}


SHAPES = {"dense": {"kernel": (6, 4), "bias": (4,)}, "conv": {"kernel": (2, 2, 3, 5)}}


def _experts(seed=0, shapes=SHAPES, count=3):
    rng = np.random.default_rng(seed)
    base = _params(rng, shapes)
    models = [jax.tree.map(lambda b: b + rng.normal(size=b.shape).astype(np.float32), base) for _ in range(count)]
    return base, models


def _np_shared(base, models):
    return jax.tree.map(lambda b, *ms: np.float64(b) + SCALING * sum(np.float64(m) - b for m in ms), base, *models)


def _np_rank_r(delta, rank):
    """NumPy's truncated SVD of the leaf as an [prod(shape[:-1]), shape[-1]] matrix, back in the leaf's shape."""
    u, s, vh = np.linalg.svd(delta.reshape(-1, delta.shape[-1]), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(delta.shape)


def _np_merged(base, models, weights, rank):
    """θ* + Σᵢ rᵢ · rank-r SVD(θᵢ − θ*), computed leaf by leaf in float64 from the formula."""
    shared = _np_shared(base, models)

    def leaf(s, *ms):
        deltas = [np.float64(m) - s for m in ms]
        if s.ndim >= 2:
            deltas = [_np_rank_r(d, rank) for d in deltas]
        return s + sum(w * d for w, d in zip(weights, deltas))

    return jax.tree.map(leaf, shared, *models)


def test_compression_is_numpy_truncated_svd_and_exact_at_full_rank():
    base, models = _experts()
    twin = twin_compress(base, models, rank=2)
    shared = _np_shared(base, models)
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5), twin.shared, shared)
    for name, key in [("dense", "kernel"), ("conv", "kernel")]:
        factors = twin.exclusive[name][key]
        assert isinstance(factors, LowRank) and factors.us.shape[-1] == 2
        for i, m in enumerate(models):
            got = np.asarray(factors.us[i] @ factors.vs[i].T).reshape(m[name][key].shape)
            want = _np_rank_r(np.float64(m[name][key]) - shared[name][key], 2)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # 1-D leaves stay dense and exact: θᵢ − θ*.
    np.testing.assert_allclose(twin.exclusive["dense"]["bias"],
                               np.stack([np.float64(m["dense"]["bias"]) - shared["dense"]["bias"] for m in models]),
                               rtol=1e-5, atol=1e-5)
    # Full rank: θ* plus expert i's whole exclusive part is expert i itself.
    full_shapes = {"dense": {"kernel": (5, 3), "bias": (3,)}, "conv": {"kernel": (2, 2, 1, 3)}}
    base, models = _experts(1, full_shapes)
    twin = twin_compress(base, models, rank=3)
    merge = jax.jit(twin_merged_params)  # one compile for the three experts
    for i, m in enumerate(models):
        merged = merge(twin, jnp.eye(3)[i])
        jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4), merged, m)


def test_density_keeps_a_fraction_of_each_leafs_singular_values():
    base, models = _experts()
    weights = np.array([0.5, -0.25, 1.0])
    # density 0.2: dense/kernel (6x4) keeps int(0.8) = 0 singular values, conv/kernel (12x5) int(1.0) = 1.
    twin = twin_compress(base, models, density=0.2)
    assert twin.exclusive["dense"]["kernel"].us.shape == (3, 6, 0)
    assert twin.exclusive["conv"]["kernel"].us.shape == (3, 12, 1)
    got = jax.jit(twin_merged_params)(twin, jnp.asarray(weights, jnp.float32))
    shared = _np_shared(base, models)
    want_conv = shared["conv"]["kernel"] + sum(
        w * _np_rank_r(np.float64(m["conv"]["kernel"]) - shared["conv"]["kernel"], 1) for w, m in zip(weights, models))
    np.testing.assert_allclose(got["conv"]["kernel"], want_conv, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["dense"]["kernel"], shared["dense"]["kernel"], rtol=1e-5, atol=1e-5)
    want_bias = shared["dense"]["bias"] + sum(w * (np.float64(m["dense"]["bias"]) - shared["dense"]["bias"])
                                              for w, m in zip(weights, models))
    np.testing.assert_allclose(got["dense"]["bias"], want_bias, rtol=1e-5, atol=1e-5)


def test_compress_under_jit_and_with_a_given_shared_merge():
    base, models = _experts()
    eager = twin_compress(base, models, rank=2)
    jitted = jax.jit(functools.partial(twin_compress, rank=2))(base, models)
    w = jnp.array([0.2, 0.5, 0.3])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 twin_merged_params(eager, w), twin_merged_params(jitted, w))
    # A given shared model (the official --share_expert): expert 0 itself leaves it no exclusive knowledge.
    twin = twin_compress(base, models, rank=2, shared=models[0])
    np.testing.assert_allclose(twin.exclusive["dense"]["kernel"].us[0], 0.0, atol=1e-6)
    assert twin.shared is models[0]
    called = twin_compress(base, models, rank=2, shared=lambda b, ms: ms[1])
    np.testing.assert_allclose(called.exclusive["dense"]["bias"][1], 0.0, atol=1e-6)


class _Net(nn.Module):
    """Dense(3) → sow "hidden" → relu → Dense(2): the router reads "hidden" of the shared model."""

    @nn.compact
    def __call__(self, x, train=False):
        h = nn.Dense(3, name="body")(x)
        self.sow("intermediates", "hidden", h)
        return nn.Dense(2, name="head")(nn.relu(h))


def _np_forward(params, x):
    h = x @ params["body"]["kernel"] + params["body"]["bias"]
    return h, np.maximum(h, 0) @ params["head"]["kernel"] + params["head"]["bias"]


def _np_router(params, f):
    h = f @ params["hidden_0"]["kernel"] + params["hidden_0"]["bias"]
    h = np.where(h > 0, h, 0.01 * h)  # leaky_relu
    logits = h @ params["out"]["kernel"] + params["out"]["bias"]
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_router_softmax_per_input_params_and_forward_equal_numpy():
    rng = np.random.default_rng(3)
    net = from_linen(_Net())
    x = rng.normal(size=(4, 5)).astype(np.float32)
    base = jax.tree.map(np.asarray, net.init(jax.random.PRNGKey(0), x)["params"])
    models = [jax.tree.map(lambda b: b + rng.normal(size=b.shape).astype(np.float32), base) for _ in range(3)]
    twin = twin_compress(base, models, rank=1)
    router = TwinRouter(num_experts=3, hidden=(4,))
    router_params = {"hidden_0": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=4)},
                     "out": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=3)}}
    router_params = jax.tree.map(lambda a: np.asarray(a, np.float32), router_params)

    features, _ = _np_forward(_np_shared(base, models), np.float64(x))
    want_w = _np_router(jax.tree.map(np.float64, router_params), features)
    got_w = twin_router_weights(router, router_params, jnp.asarray(features, jnp.float32))
    np.testing.assert_allclose(got_w, want_w, rtol=1e-4, atol=1e-5)

    want_logits = []
    merge = jax.jit(twin_merged_params)  # one compile for the four examples
    for b in range(len(x)):
        want = _np_merged(base, models, want_w[b], rank=1)
        got = merge(twin, got_w[b])
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4), got, want)
        want_logits.append(_np_forward(want, np.float64(x[b]))[1])
    logits = twin_apply(net, twin, router, router_params, x, feature="hidden")
    np.testing.assert_allclose(logits, np.stack(want_logits), rtol=1e-4, atol=1e-4)
    in_groups = twin_apply(net, twin, router, router_params, x, feature="hidden", batch_size=3)
    np.testing.assert_allclose(in_groups, logits, rtol=1e-5, atol=1e-5)


def test_router_features_average_the_token_axes_of_the_shared_models_feature():
    tokens = np.random.default_rng(4).normal(size=(2, 3, 4)).astype(np.float32)  # [batch, tokens, D]
    model = Model(init=None, apply=lambda v, x, *, train, rngs=None: Outputs(
        logits=x.sum(-1), features={"last_hidden": x * v["params"]["scale"]}, model_state={}))
    twin = TwinVectors(shared={"scale": np.float32(2.0)}, exclusive={"scale": np.zeros((2,), np.float32)},
                       num_experts=2, rank=1)
    got = twin_router_features(model, twin, tokens, feature="last_hidden")
    np.testing.assert_allclose(got, 2.0 * tokens.mean(axis=1), rtol=1e-6)
    with pytest.raises(ValueError, match="does not sow a feature named 'hidden'"):
        twin_router_features(model, twin, tokens, feature="hidden")


def test_router_training_learns_separable_routes():
    rng = np.random.default_rng(0)
    centers = np.array([[3.0, 0.0], [-3.0, 3.0], [0.0, -3.0]])
    labels = np.repeat(np.arange(3), 16)
    features = (centers[labels] + 0.5 * rng.normal(size=(48, 2))).astype(np.float32)
    router = TwinRouter(num_experts=3, hidden=(8,))
    key = jax.random.PRNGKey(0)
    initial = router.init(jax.random.split(key)[0], features[:1])["params"]  # the params training starts from
    params = train_twin_router(router, features, labels, rng=key, steps=150, learning_rate=0.05, batch_size=32)
    before = float(twin_router_loss(router, initial, features, labels))
    after = float(twin_router_loss(router, params, features, labels))
    assert after < 0.2 * before
    routes = np.argmax(np.asarray(twin_router_weights(router, params, features)), -1)
    np.testing.assert_array_equal(routes, labels)


def test_bad_input_is_refused():
    base, models = _experts()
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        twin_compress(base, models, rank=0)
    with pytest.raises(ValueError, match="rank=5 exceeds the smaller side of 'dense/kernel'"):
        twin_compress(base, models, rank=5)
    with pytest.raises(ValueError, match="exactly one of rank= .* and density="):
        twin_compress(base, models)
    with pytest.raises(ValueError, match="exactly one of rank= .* and density="):
        twin_compress(base, models, rank=1, density=0.5)
    for density in (0.0, 1.5):
        with pytest.raises(ValueError, match="density"):
            twin_compress(base, models, density=density)
    with pytest.raises(ValueError, match="at least 2 models"):
        twin_compress(base, models[:1], rank=1)
    other_tree = [models[0], {"dense": models[1]["dense"], "conv2": models[1]["conv"]}]
    with pytest.raises(ValueError, match="tree differs"):
        twin_compress(base, other_tree, rank=1)
    other_shape = [models[0], {**models[1], "dense": {"kernel": np.zeros((6, 3)), "bias": np.zeros(4)}}]
    with pytest.raises(ValueError, match=r"dense/kernel.*\(6, 3\)"):
        twin_compress(base, other_shape, rank=1)
    with pytest.raises(ValueError, match="shared must be"):
        twin_compress(base, models, rank=1, shared="ties")
    twin = twin_compress(base, models, rank=1)
    with pytest.raises(ValueError, match=r"router weights must have shape \[3\]"):
        twin_merged_params(twin, jnp.ones(2) / 2)
    with pytest.raises(ValueError, match="expert_labels must lie in"):
        train_twin_router(TwinRouter(num_experts=2, hidden=()), np.zeros((4, 2), np.float32), np.array([0, 1, 2, 0]),
                          rng=jax.random.PRNGKey(0), steps=1)


def test_fsdp_sharded_experts_give_the_single_device_twin_and_merged_params_keep_the_sharding():
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxkd import sharding

    mesh = sharding.make_mesh({"fsdp": 8})
    rng = np.random.default_rng(0)
    base = {"w": rng.normal(size=(16, 64)).astype(np.float32), "b": rng.normal(size=(64,)).astype(np.float32)}
    experts = [jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32), base) for _ in range(3)]
    layout = {"w": NamedSharding(mesh, PartitionSpec(None, "fsdp")), "b": NamedSharding(mesh, PartitionSpec())}
    put = lambda tree: jax.tree.map(jax.device_put, tree, layout)  # noqa: E731
    single = twin_compress(base, experts, rank=4)
    sharded = twin_compress(put(base), [put(e) for e in experts], rank=4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
                 sharded, single)
    routes = np.array([0.2, 0.5, 0.3], np.float32)
    merged = twin_merged_params(sharded, routes)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
                 merged, twin_merged_params(single, routes))
    assert merged["w"].sharding.is_equivalent_to(layout["w"], 2) and sharded.shared["w"].sharding == layout["w"]
