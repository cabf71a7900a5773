"""Tests for the model zoo: parameter counts, sown features, BatchNorm state, dtypes, registry."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import models

BATCH = 2
CIFAR = jax.ShapeDtypeStruct((BATCH, 32, 32, 3), jnp.float32)

# name -> (published size in millions at 100 classes, exact parameter count of our module).
# Published sizes: RepDistiller (Tian et al., ICLR 2020) / mdistiller tables. resnet14 is listed
# there less often; RepDistiller's architecture gives 181,108 (0.18M).
PARAM_COUNTS = {
    "resnet8": (0.08, 83_892),
    "resnet14": (0.18, 181_108),
    "resnet20": (0.28, 278_324),
    "resnet32": (0.47, 472_756),
    "resnet44": (0.67, 667_188),
    "resnet56": (0.86, 861_620),
    "resnet110": (1.74, 1_736_564),
    "resnet8x4": (1.23, 1_233_540),
    "resnet32x4": (7.43, 7_433_860),
    "wrn_16_2": (0.70, 703_284),
    "wrn_40_1": (0.57, 569_780),
    "wrn_40_2": (2.26, 2_255_156),
}


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _key():
    # The "rbg" PRNG compiles several times faster on CPU than the default threefry, whose
    # per-shape kernels dominate a ResNet init's compile time; any random weights will do here.
    return jax.random.key(0, impl="rbg")


def _images(shape=CIFAR.shape):
    return jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)


@functools.cache
def _cifar_run(name):
    """``(initial variables, eval Outputs, train Outputs)`` of ``name`` (float32, 10 classes) on
    :func:`_images`, traced as one jitted function (one compile) and cached for the session."""
    model = models.get(name, num_classes=10)

    @jax.jit
    def run(key, x):
        variables = model.init(key, x)
        eval_out = model.apply(variables, x, train=False)
        return variables, eval_out, model.apply(variables, x, train=True)

    return run(_key(), _images())


def _apply(model, variables, x, *, train):
    return jax.jit(model.apply, static_argnames="train")(variables, x, train=train)


def test_available_lists_every_architecture():
    assert models.available() == sorted([*PARAM_COUNTS, "mlp", "mobilenetv2", "shufflenetv1", "shufflenetv2", "vit", "vit_tiny",
                                         # torchvision's ImageNet models (tests/test_imagenet_models.py)
                                         "resnet18", "resnet34", "resnet50", "mobilenet_v2",
                                         # RepDistiller's VGGs, CIFAR ResNet50 and official-name aliases
                                         # (their counts: tests/test_torch_load.py)
                                         "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "cifar_resnet50", "wrn_16_1",
                                         "ResNet50", "MobileNetV2", "ShuffleV1", "ShuffleV2"])


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_count_matches_published(name):
    published_m, exact = PARAM_COUNTS[name]
    variables = jax.eval_shape(models.get(name, num_classes=100).init, _key(), CIFAR)
    count = _count(variables["params"])
    assert count == exact
    # 2% of the published figure, but never tighter than its rounding to 0.01M (resnet8: 0.08M).
    assert abs(count - published_m * 1e6) <= max(0.02 * published_m * 1e6, 0.005e6)
    assert set(variables) == {"params", "batch_stats"}


@pytest.fixture(scope="module", params=["resnet8", "wrn_16_2"])
def conv_net(request):
    """``(name, initial variables, eval Outputs, train Outputs)``."""
    return (request.param, *_cifar_run(request.param))


FEATURE_SHAPES = {
    "resnet8": {
        "stem": (BATCH, 32, 32, 16),
        "stage1": (BATCH, 32, 32, 16),
        "stage2": (BATCH, 16, 16, 32),
        "stage3": (BATCH, 8, 8, 64),
        "stage1_preact": (BATCH, 32, 32, 16),
        "stage2_preact": (BATCH, 16, 16, 32),
        "stage3_preact": (BATCH, 8, 8, 64),
        "pooled": (BATCH, 64),
    },
    "wrn_16_2": {
        "stem": (BATCH, 32, 32, 16),
        "stage1": (BATCH, 32, 32, 32),
        "stage2": (BATCH, 16, 16, 64),
        "stage3": (BATCH, 8, 8, 128),
        "stage1_preact": (BATCH, 32, 32, 32),
        "stage2_preact": (BATCH, 16, 16, 64),
        "stage3_preact": (BATCH, 8, 8, 128),
        "prepool": (BATCH, 8, 8, 128),
        "pooled": (BATCH, 128),
    },
}


def test_conv_net_logits_and_features(conv_net):
    name, _, out, _ = conv_net
    assert out.logits.shape == (BATCH, 10) and out.logits.dtype == jnp.float32
    assert {k: v.shape for k, v in out.features.items()} == FEATURE_SHAPES[name]
    pooled_map = out.features["prepool" if name.startswith("wrn") else "stage3"]
    assert bool(jnp.all(pooled_map >= 0))  # post-activation
    np.testing.assert_allclose(
        out.features["pooled"], pooled_map.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6
    )
    # Pre-activation features: the ReLU of the resnet's preact is its post-activation feature; the WRN's
    # preact is the BatchNorm'd stage output, whose ReLU is the pooled map for stage 3.
    for stage in (1, 2, 3):
        preact = out.features[f"stage{stage}_preact"]
        assert bool(jnp.any(preact < 0))
        if name.startswith("resnet"):
            np.testing.assert_array_equal(jax.nn.relu(preact), out.features[f"stage{stage}"])
    if name.startswith("wrn"):
        np.testing.assert_allclose(jax.nn.relu(out.features["stage3_preact"]), pooled_map, rtol=1e-6, atol=1e-6)


def test_conv_net_batch_stats_update_only_in_train(conv_net):
    _, variables, eval_out, train_out = conv_net
    initial = variables["batch_stats"]

    trained = train_out.model_state["batch_stats"]
    assert jax.tree.structure(trained) == jax.tree.structure(initial)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), trained, initial)
    assert all(jax.tree.leaves(changed))

    jax.tree.map(np.testing.assert_array_equal, eval_out.model_state["batch_stats"], initial)


def test_mlp_flattens_and_sows_hidden_layers():
    model = models.get("mlp", num_classes=10, hidden_sizes=(32, 16))
    x = _images(shape=(BATCH, 8, 8, 1))
    variables = jax.jit(model.init)(_key(), x)
    assert set(variables) == {"params"}
    out = _apply(model, variables, x, train=True)
    assert out.logits.shape == (BATCH, 10) and out.logits.dtype == jnp.float32
    assert {k: v.shape for k, v in out.features.items()} == {
        "hidden1": (BATCH, 32),
        "hidden2": (BATCH, 16),
        "pooled": (BATCH, 16),
    }
    np.testing.assert_array_equal(out.features["pooled"], out.features["hidden2"])
    assert out.model_state == {}


def test_mlp_default_hidden_sizes():
    variables = jax.eval_shape(models.get("mlp", num_classes=10).init, _key(), CIFAR)
    kernels = [variables["params"][k]["kernel"].shape for k in ("dense1", "dense2", "fc")]
    assert kernels == [(32 * 32 * 3, 256), (256, 256), (256, 10)]


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match="nope") as info:
        models.get("nope", num_classes=10)
    for name in models.available():
        assert name in str(info.value)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = models.get("resnet8", num_classes=10, dtype=jnp.bfloat16)
    x = _images()
    variables, _, _ = _cifar_run("resnet8")  # the float32 model's variables fit the bf16 model
    abstract = jax.eval_shape(model.init, _key(), x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(
        lambda a: (a.shape, a.dtype), variables
    )
    out = _apply(model, variables, x, train=True)
    assert out.logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out.logits)))
    assert out.features["stage3"].dtype == jnp.bfloat16
    assert {leaf.dtype for leaf in jax.tree.leaves(out.model_state)} == {jnp.dtype(jnp.float32)}


# ---------------------------------------------------------------- argument and input checks


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("resnet8", {"num_classes": 0}, r"num_classes must be an integer >= 1, got num_classes=0"),
        ("mlp", {"num_classes": -3}, r"num_classes must be an integer >= 1, got num_classes=-3"),
        ("wrn_16_2", {"num_classes": 10.0}, r"num_classes must be an integer, got num_classes=10\.0"),
        ("mlp", {"num_classes": 10, "hidden_sizes": (32, 0)}, r"hidden_sizes\[1\] must be an integer >= 1"),
        ("mlp", {"num_classes": 10, "hidden_sizes": (32.5,)}, r"hidden_sizes\[0\] must be an integer"),
        ("mlp", {"num_classes": 10, "hidden_sizes": 32}, r"hidden_sizes must be a sequence"),
        ("wrn_16_2", {"num_classes": 10, "dropout_rate": 1.0}, r"dropout_rate must lie in \[0, 1\)"),
        ("wrn_40_1", {"num_classes": 10, "dropout_rate": -0.1}, r"dropout_rate must lie in \[0, 1\)"),
        ("wrn_40_2", {"num_classes": 10, "dropout_rate": float("nan")}, r"dropout_rate must be a finite"),
    ],
)
def test_get_refuses_bad_arguments(name, kwargs, match):
    """Bad constructor arguments fail in ``get`` naming the argument (num_classes=0 used to be a
    ZeroDivisionError at init)."""
    with pytest.raises(ValueError, match=match):
        models.get(name, **kwargs)


def _abstract_apply(model, variables, x):
    """Output shapes of an eval-mode forward pass, traced without compiling."""
    return jax.eval_shape(functools.partial(model.apply, train=False), variables, x)


# Shape checks only: eval_shape traces init/apply without compiling.
INPUT_MODELS = ["resnet8", "wrn_16_2", "mlp"]


@pytest.mark.parametrize("name", INPUT_MODELS)
def test_models_refuse_unnormalized_integer_images(name):
    """uint8 images (0..255) would train unnormalized: refused at init and at apply."""
    model = models.get(name, num_classes=10)
    uint8 = jax.ShapeDtypeStruct(CIFAR.shape, jnp.uint8)
    match = r"expects floating-point images normalized with jaxkd\.data\.normalize.*got uint8 input"
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(model.init, _key(), uint8)
    variables = jax.eval_shape(model.init, _key(), CIFAR)
    with pytest.raises(ValueError, match=match):
        _abstract_apply(model, variables, uint8)
    with pytest.raises(ValueError, match=r"got int32 input"):
        _abstract_apply(model, variables, jax.ShapeDtypeStruct(CIFAR.shape, jnp.int32))


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_2"])
@pytest.mark.parametrize("shape", [(32, 32, 3), (BATCH, 1, 32, 32, 3)])
def test_conv_nets_refuse_non_nhwc_input(name, shape):
    """Unbatched or 5-d inputs are refused with the expected layout named."""
    model = models.get(name, num_classes=10)
    with pytest.raises(ValueError, match=r"expects images of shape \[batch, height, width, channels\]"):
        jax.eval_shape(model.init, _key(), jax.ShapeDtypeStruct(shape, jnp.float32))


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_2"])
def test_conv_nets_name_channel_mismatch(name):
    """Applying to another channel count names the input, not the stem kernel's shape."""
    model = models.get(name, num_classes=10)
    grey = jax.eval_shape(model.init, _key(), jax.ShapeDtypeStruct((BATCH, 8, 8, 1), jnp.float32))
    match = r"initialized for 1-channel images, got 3 channels \(input shape \(2, 32, 32, 3\)\)"
    with pytest.raises(ValueError, match=match):
        _abstract_apply(model, grey, CIFAR)
    # Another image size is fine (global average pooling), as is the right channel count.
    out = _abstract_apply(model, grey, jax.ShapeDtypeStruct((BATCH, 16, 16, 1), jnp.float32))
    assert out.logits.shape == (BATCH, 10)


@pytest.mark.parametrize("hidden_sizes", [(16,), ()])
def test_mlp_names_input_size_mismatch(hidden_sizes):
    """The MLP compares the flattened input size with its first Dense kernel (dense1 or fc)."""
    model = models.get("mlp", num_classes=10, hidden_sizes=hidden_sizes)
    variables = jax.eval_shape(model.init, _key(), jax.ShapeDtypeStruct((BATCH, 8, 8, 1), jnp.float32))
    match = r"initialized for inputs of 64 values per example .*got 3072 .*input shape \(2, 32, 32, 3\)"
    with pytest.raises(ValueError, match=match):
        _abstract_apply(model, variables, CIFAR)
    with pytest.raises(ValueError, match=r"expects an input of shape \[batch, \.\.\.\]"):
        _abstract_apply(model, variables, jax.ShapeDtypeStruct((64,), jnp.float32))
    out = _abstract_apply(model, variables, jax.ShapeDtypeStruct((BATCH, 64), jnp.float32))
    assert out.logits.shape == (BATCH, 10)


# ----- from_linen(capture=...): layer outputs of a model that sows nothing -----

import flax.linen as nn  # noqa: E402

from jaxkd.models.base import from_linen  # noqa: E402


class _Plain(nn.Module):
    """Dense -> relu -> Dense with no ``sow`` at all."""

    @nn.compact
    def __call__(self, x, train):
        del train
        h = nn.relu(nn.Dense(8)(x))  # Dense_0 (Linen numbers submodules in construction order)
        return nn.Dense(3)(h)  # Dense_1


class _Block(nn.Module):
    sow_clash: bool = False

    @nn.compact
    def encode(self, x):
        y = nn.Dense(4)(x)
        if self.sow_clash:
            self.sow("intermediates", "encode", y)
        return y

    def __call__(self, x):
        return nn.relu(self.encode(x))


class _Nested(nn.Module):
    """A submodule with a second method, a BatchNorm and a sown feature."""

    sow_clash: bool = False

    @nn.compact
    def __call__(self, x, train):
        h = _Block(sow_clash=self.sow_clash, name="block")(x)
        h = nn.BatchNorm(use_running_average=not train, name="bn")(h)
        self.sow("intermediates", "hidden", h)
        return nn.Dense(3, name="head")(h)


def _plain_inputs():
    return np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)


def _run(model, x, *, train=False, variables=None):
    variables = model.init(jax.random.key(0), x) if variables is None else variables
    return variables, _apply(model, variables, x, train=train)


@pytest.mark.parametrize("train", [False, True])
def test_capture_path_equals_hand_computed_layer_output(train):
    x = _plain_inputs()
    model = from_linen(_Plain(), capture=("Dense_0",))
    variables, out = _run(model, x, train=train)
    params = jax.tree.map(np.asarray, variables["params"])
    w, b = params["Dense_0"]["kernel"].astype(np.float64), params["Dense_0"]["bias"].astype(np.float64)
    assert set(out.features) == {"Dense_0"}
    np.testing.assert_allclose(out.features["Dense_0"], x.astype(np.float64) @ w + b, rtol=1e-5, atol=1e-5)
    # Capturing changes nothing else: same logits as the plain wrapper, which has no features.
    _, plain = _run(from_linen(_Plain()), x, train=train, variables=variables)
    assert plain.features == {}
    np.testing.assert_array_equal(out.logits, plain.logits)


def test_capture_true_lists_every_submodule_but_not_the_top_module():
    x = _plain_inputs()
    _, out = _run(from_linen(_Plain(), capture=True), x)
    assert set(out.features) == {"Dense_0", "Dense_1"}
    np.testing.assert_array_equal(out.features["Dense_1"], out.logits)  # the last layer's output

    _, nested = _run(from_linen(_Nested(), capture=True), x, train=True)
    # Every submodule's __call__ output (nested paths joined by "/"), next to the sown "hidden".
    assert set(nested.features) == {"block", "block/Dense_0", "bn", "head", "hidden"}
    np.testing.assert_array_equal(nested.features["bn"], nested.features["hidden"])
    np.testing.assert_array_equal(nested.features["block"], jnp.maximum(nested.features["block/Dense_0"], 0))


def test_capture_callable_filter_and_method_names():
    x = _plain_inputs()
    only_last = from_linen(_Plain(), capture=lambda mdl, method: method == "__call__" and mdl.name == "Dense_1")
    _, out = _run(only_last, x)
    assert set(out.features) == {"Dense_1"}

    # A method other than __call__ is named "path/method", by a callable or by a path string.
    by_method = from_linen(_Nested(), capture=lambda mdl, method: method == "encode")
    _, out = _run(by_method, x)
    assert set(out.features) == {"block/encode", "hidden"}
    _, by_path = _run(from_linen(_Nested(), capture=["block/encode", "block/Dense_0"]), x)
    assert set(by_path.features) == {"block/encode", "block/Dense_0", "hidden"}
    np.testing.assert_array_equal(by_path.features["block/encode"], by_path.features["block/Dense_0"])
    np.testing.assert_array_equal(out.features["block/encode"], by_path.features["block/encode"])


def test_capture_in_train_and_eval_mode_with_batch_stats():
    x = _plain_inputs()
    model = from_linen(_Nested(), capture=("bn",))
    variables, train_out = _run(model, x, train=True)
    _, eval_out = _run(model, x, train=False, variables=variables)
    # Train mode normalizes with the batch's statistics (per-feature mean 0), eval with the running ones.
    np.testing.assert_allclose(np.asarray(train_out.features["bn"]).mean(axis=0), 0, atol=1e-5)
    assert not np.allclose(train_out.features["bn"], eval_out.features["bn"])
    assert set(train_out.model_state) == {"batch_stats"}
    jax.tree.map(np.testing.assert_array_equal, eval_out.model_state, {"batch_stats": variables["batch_stats"]})


def test_capture_unknown_path_lists_available_module_paths():
    x = _plain_inputs()
    model = from_linen(_Nested(), capture=("block", "blok/Dense_0"))
    variables = model.init(jax.random.key(0), x)
    for apply in (model.apply, jax.jit(model.apply, static_argnames="train")):
        with pytest.raises(ValueError, match=r"\['blok/Dense_0'\]") as info:
            apply(variables, x, train=False)
        for path in ("block", "block/Dense_0", "block/encode", "bn", "head"):
            assert repr(path) in str(info.value)


@pytest.mark.parametrize("capture", [(), [1], "", ("ok", "")])
def test_capture_refuses_malformed_values(capture):
    with pytest.raises(ValueError, match="capture="):
        from_linen(_Plain(), capture=capture)


def test_capture_name_clash_with_a_sow_raises():
    x = _plain_inputs()
    model = from_linen(_Nested(sow_clash=True), capture=("block/encode",))
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="block/encode") as info:
        model.apply(variables, x, train=False)
    assert "sow" in str(info.value)


def test_capture_gradient_matches_closed_form():
    x = _plain_inputs()
    model = from_linen(_Plain(), capture=("Dense_0",))
    variables = model.init(jax.random.key(0), x)
    target = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)

    def loss(params):
        feature = model.apply({"params": params}, x, train=True).features["Dense_0"]
        return 0.5 * jnp.sum((feature - target) ** 2)

    grads = jax.jit(jax.grad(loss))(variables["params"])
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    x64 = x.astype(np.float64)
    residual = x64 @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"] - target
    np.testing.assert_allclose(grads["Dense_0"]["kernel"], x64.T @ residual, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads["Dense_0"]["bias"], residual.sum(axis=0), rtol=1e-4, atol=1e-4)
    # The loss does not read the second layer, so its gradient is exactly zero.
    assert all(not np.any(g) for g in jax.tree.leaves(grads["Dense_1"]))
