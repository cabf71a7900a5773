"""Tests for RepDistiller's CIFAR mobile nets (MobileNetV2, ShuffleNetV1/V2) and the Vision Transformer.

Parameter counts are compared with RepDistiller's official definitions (HobbitLong/RepDistiller,
``models/mobilenetv2.py`` ``mobile_half``, ``models/ShuffleNetv1.py`` ``ShuffleV1``, ``models/ShuffleNetv2.py``
``ShuffleV2``; mdistiller ships the same files): :func:`_official_count_mobile_half` etc. count the
parameters those PyTorch definitions create, layer by layer, at 100 classes: 812,836 / 949,258 /
1,355,528, i.e. 0.81M / 0.95M / 1.36M.

Numerical checks run on variables filled from shapes with NumPy (``jax.eval_shape`` of ``init`` + random
values) so that only the forward pass is compiled; shape-only checks use ``jax.eval_shape``.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import methods, models
from jaxkd.models.shufflenet import ShuffleV1Unit, channel_shuffle
from jaxkd.models.vit import VIT_TINY
from tests.helpers import NUM_CLASSES, tiny_image_batch

BATCH = 2
CIFAR = jax.ShapeDtypeStruct((BATCH, 32, 32, 3), jnp.float32)
CNNS = ("mobilenetv2", "shufflenetv1", "shufflenetv2")


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _key():
    return jax.random.key(0, impl="rbg")


def _images(shape=CIFAR.shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# ------------------------------------------------ parameter counts of the official PyTorch definitions


def _conv(cin, cout, k, groups=1):
    """``nn.Conv2d(cin, cout, k, groups=groups, bias=False)``."""
    return k * k * (cin // groups) * cout


def _bn(c):
    return 2 * c  # weight, bias (running stats are buffers)


def _linear(cin, cout):
    return cin * cout + cout


def _official_count_mobile_half(num_classes):
    """RepDistiller ``mobile_half``: MobileNetV2(T=6, width_mult=0.5); ``t = 1`` blocks keep their 1x1."""
    setting = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
               [6, 320, 1, 1]]
    cin = int(32 * 0.5)
    total = _conv(3, cin, 3) + _bn(cin)
    for t, c, n, _ in setting:
        cout = int(c * 0.5)
        for _ in range(n):
            hid = cin * t
            total += _conv(cin, hid, 1) + _bn(hid) + _conv(hid, hid, 3, hid) + _bn(hid)
            total += _conv(hid, cout, 1) + _bn(cout)
            cin = cout
    return total + _conv(cin, 1280, 1) + _bn(1280) + _linear(1280, num_classes)


def _official_count_shuffle_v1(num_classes):
    """RepDistiller ``ShuffleV1``: out_planes 240/480/960, blocks 4/8/4, groups 3."""
    total = _conv(3, 24, 1) + _bn(24)
    cin = 24
    for planes, blocks in zip([240, 480, 960], [4, 8, 4]):
        for i in range(blocks):
            cout = planes - (cin if i == 0 else 0)
            mid = int(cout / 4)
            g = 1 if cin == 24 else 3
            total += _conv(cin, mid, 1, g) + _bn(mid) + _conv(mid, mid, 3, mid) + _bn(mid)
            total += _conv(mid, cout, 1, 3) + _bn(cout)
            cin = planes
    return total + _linear(960, num_classes)


def _official_count_shuffle_v2(num_classes):
    """RepDistiller ``ShuffleV2`` (net_size 1): out_channels 116/232/464/1024, blocks 3/7/3."""
    total = _conv(3, 24, 1) + _bn(24)
    cin = 24
    for cout, blocks in zip([116, 232, 464], [3, 7, 3]):
        mid = cout // 2
        total += _conv(cin, cin, 3, cin) + _bn(cin) + _conv(cin, mid, 1) + _bn(mid)  # DownBlock left
        total += _conv(cin, mid, 1) + _bn(mid) + _conv(mid, mid, 3, mid) + _bn(mid)  # right
        total += _conv(mid, mid, 1) + _bn(mid)
        half = cout // 2
        total += blocks * (2 * (_conv(half, half, 1) + _bn(half)) + _conv(half, half, 3, half) + _bn(half))
        cin = cout
    return total + _conv(464, 1024, 1) + _bn(1024) + _linear(1024, num_classes)


# name -> (published size in millions at 100 classes, official definition's exact count)
PUBLISHED = {
    "mobilenetv2": (0.81, _official_count_mobile_half(100)),
    "shufflenetv1": (0.95, _official_count_shuffle_v1(100)),
    "shufflenetv2": (1.36, _official_count_shuffle_v2(100)),
}


@functools.cache
def _abstract(name, dtype=jnp.float32):
    """``(variables, eval Outputs, train Outputs)`` of ``name`` at 100 classes on 32x32 images, traced with
    ``jax.eval_shape`` (shapes and dtypes only, nothing compiled); bfloat16 is traced in train mode only."""
    model = models.get(name, num_classes=100, dtype=dtype)
    variables = jax.eval_shape(model.init, _key(), CIFAR)
    modes = (False, True) if dtype == jnp.float32 else (True,)
    outs = [jax.eval_shape(functools.partial(model.apply, train=train), variables, CIFAR) for train in modes]
    return (variables, *outs)


@pytest.mark.parametrize("name", CNNS)
def test_parameter_count_matches_official_definition(name):
    published_m, official = PUBLISHED[name]
    assert official == {"mobilenetv2": 812_836, "shufflenetv1": 949_258, "shufflenetv2": 1_355_528}[name]
    variables = _abstract(name)[0]
    count = _count(variables["params"])
    assert count == official
    assert abs(count - published_m * 1e6) <= 0.02 * published_m * 1e6
    assert set(variables) == {"params", "batch_stats"}


def _vit_count(*, channels, image, patch_size, hidden, depth, heads, mlp_dim, num_classes):
    """ViT parameters from the architecture: patch conv, class token, positions, blocks, final LN, head."""
    del heads  # the q/k/v/out projections are hidden x hidden whatever the split into heads
    tokens = (image // patch_size) ** 2 + 1
    block = 4 * (hidden * hidden + hidden) + 2 * 2 * hidden + _linear(hidden, mlp_dim) + _linear(mlp_dim, hidden)
    return (patch_size * patch_size * channels * hidden + hidden + hidden + tokens * hidden
            + depth * block + 2 * hidden + _linear(hidden, num_classes))


def test_vit_parameter_count_matches_architecture():
    variables = _abstract("vit_tiny")[0]
    assert set(variables) == {"params"}
    expected = _vit_count(channels=3, image=32, num_classes=100, **VIT_TINY)
    assert _count(variables["params"]) == expected == 2_710_948


def test_registry_lists_the_new_architectures():
    assert {*CNNS, "vit", "vit_tiny"} <= set(models.available())
    assert VIT_TINY == dict(patch_size=4, hidden=192, depth=6, heads=3, mlp_dim=768)
    module = models.get("vit_tiny", num_classes=10, patch_size=2).module
    assert (module.patch_size, module.hidden, module.depth, module.heads, module.mlp_dim) == (2, 192, 6, 3, 768)


# ------------------------------------------------------------------------- features at 32x32 (shapes)

FEATURE_SHAPES = {
    "mobilenetv2": {
        "stem": (BATCH, 16, 16, 16),
        **{f"stage{i}{s}": shape for i, shape in enumerate(
            [(BATCH, 16, 16, 12), (BATCH, 8, 8, 16), (BATCH, 4, 4, 48), (BATCH, 2, 2, 160)], start=1)
           for s in ("", "_preact")},
        "prepool": (BATCH, 2, 2, 1280),
        "pooled": (BATCH, 1280),
    },
    "shufflenetv1": {
        "stem": (BATCH, 32, 32, 24),
        **{f"stage{i}{s}": shape for i, shape in enumerate(
            [(BATCH, 16, 16, 240), (BATCH, 8, 8, 480), (BATCH, 4, 4, 960)], start=1) for s in ("", "_preact")},
        "pooled": (BATCH, 960),
    },
    "shufflenetv2": {
        "stem": (BATCH, 32, 32, 24),
        **{f"stage{i}{s}": shape for i, shape in enumerate(
            [(BATCH, 16, 16, 116), (BATCH, 8, 8, 232), (BATCH, 4, 4, 464)], start=1) for s in ("", "_preact")},
        "prepool": (BATCH, 4, 4, 1024),
        "pooled": (BATCH, 1024),
    },
    "vit_tiny": {
        "embed": (BATCH, 65, 192),
        **{f"block{i}": (BATCH, 65, 192) for i in range(1, 7)},
        **{f"block{i}_attention": (BATCH, 3, 65, 65) for i in range(1, 7)},
        "tokens": (BATCH, 65, 192),
        "pooled": (BATCH, 192),
    },
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", sorted(FEATURE_SHAPES))
def test_feature_names_shapes_and_dtypes(name, dtype):
    """At 32x32 (traced, not compiled): RepDistiller's feature list, float32 logits, float32 parameters and
    BatchNorm statistics, features in the compute dtype. (Eval mode traces with the BatchNorm statistics
    immutable, so a BatchNorm that updated them in eval mode would raise here.)"""
    variables, *outs = _abstract(name, dtype)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    for out in outs:
        assert out.logits.shape == (BATCH, 100) and out.logits.dtype == jnp.float32
        assert {k: v.shape for k, v in out.features.items()} == FEATURE_SHAPES[name]
        assert {v.dtype for v in out.features.values()} == {jnp.dtype(dtype)}
        assert {leaf.dtype for leaf in jax.tree.leaves(out.model_state)} <= {jnp.dtype(jnp.float32)}


# --------------------------------------------------------------------------- CNN forward passes


def _filled(abstract, seed=0):
    """Concrete variables of the abstract ones: random weights (std 1/sqrt(fan-in)), BN gamma 1, beta 0,
    running mean 0 and variance 1."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        key = jax.tree_util.keystr(path)
        if key.endswith("['var']") or key.endswith("['scale']"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if key.endswith("['mean']") or (key.endswith("['bias']") and "batch_stats" not in key):
            return jnp.asarray(0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 1
        return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


@functools.cache
def _cnn_run(name):
    """``(variables, train Outputs)`` on :func:`_images` (one compile per model). Eval mode is traced by
    :func:`test_feature_names_shapes_and_dtypes`, with the BatchNorm statistics immutable."""
    model = models.get(name, num_classes=10)
    x = _images()
    variables = _filled(jax.eval_shape(model.init, _key(), x))
    return variables, jax.jit(functools.partial(model.apply, train=True))(variables, x)


def _np_shuffle_nchw(x_nhwc, groups):
    """The official channel shuffle, written on NCHW as RepDistiller does: view(N, g, C/g, H, W),
    permute(0, 2, 1, 3, 4), reshape(N, C, H, W)."""
    x = np.transpose(np.asarray(x_nhwc), (0, 3, 1, 2))
    n, c, h, w = x.shape
    x = x.reshape(n, groups, c // groups, h, w).transpose(0, 2, 1, 3, 4).reshape(n, c, h, w)
    return np.transpose(x, (0, 2, 3, 1))


@pytest.mark.parametrize("name", CNNS)
def test_cnn_features_and_preactivations(name):
    _, out = _cnn_run(name)
    feats = {k: np.asarray(v) for k, v in out.features.items()}
    assert np.all(np.isfinite(np.asarray(out.logits)))
    assert np.all(feats["stem"] >= 0)  # after the stem's ReLU
    pooled_map = feats["stage3" if name == "shufflenetv1" else "prepool"]
    assert np.all(pooled_map >= 0)
    np.testing.assert_allclose(feats["pooled"], pooled_map.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    stages = 4 if name == "mobilenetv2" else 3
    for i in range(1, stages + 1):
        stage, preact = feats[f"stage{i}"], feats[f"stage{i}_preact"]
        assert np.any(preact < 0)
        # Float rounding only: XLA may fuse the feature and the block output differently (1 ulp apart).
        close = dict(rtol=1e-5, atol=1e-6)
        if name == "mobilenetv2":  # linear bottlenecks: the block output is its own pre-activation
            np.testing.assert_allclose(preact, stage, **close)
        elif name == "shufflenetv1":  # the sum (or concatenation) before the unit's final ReLU
            np.testing.assert_allclose(np.maximum(preact, 0), stage, **close)
        else:  # concat(x1, branch before its ReLU), unshuffled; the output is its ReLU, shuffled
            np.testing.assert_allclose(_np_shuffle_nchw(np.maximum(preact, 0), 2), stage, **close)


@pytest.mark.parametrize("name", CNNS)
def test_cnn_batch_stats_update_only_in_train(name):
    """Train mode updates every running statistic; eval mode runs with the statistics immutable (a
    BatchNorm that wrote them would raise flax's ModifyScopeVariableError while tracing)."""
    variables, train_out = _cnn_run(name)
    initial = variables["batch_stats"]
    trained = train_out.model_state["batch_stats"]
    assert jax.tree.structure(trained) == jax.tree.structure(initial)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), trained, initial)
    assert all(jax.tree.leaves(changed))
    # Eval mode (traced at 32x32 by _abstract) returns the statistics it was given, of the same tree.
    _, eval_out, _ = _abstract(name)
    assert jax.tree.structure(eval_out.model_state["batch_stats"]) == jax.tree.structure(initial)


@pytest.mark.parametrize("groups", [2, 3])
def test_channel_shuffle_is_the_official_nchw_shuffle(groups):
    x = np.arange(2 * 3 * 3 * 12, dtype=np.float32).reshape(2, 3, 3, 12)
    np.testing.assert_array_equal(channel_shuffle(jnp.asarray(x), groups), _np_shuffle_nchw(x, groups))


def test_shufflenetv1_stride2_unit_concatenates_avgpool_counting_padding():
    """The stride-2 unit's shortcut is PyTorch's AvgPool2d(3, stride=2, padding=1), which divides by 9
    even at the borders (count_include_pad=True); it is concatenated after the unit's own channels."""
    unit = ShuffleV1Unit(features=12, strides=2, groups=3)
    x = np.abs(np.random.default_rng(0).standard_normal((2, 5, 5, 6))).astype(np.float32)
    out, preact = jax.jit(lambda x: unit.apply(unit.init(_key(), x, False), x, False))(jnp.asarray(x))
    assert out.shape == preact.shape == (2, 3, 3, 18)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    pooled = np.stack([np.stack([padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].sum(axis=(1, 2)) / 9.0
                                 for j in range(3)], axis=1) for i in range(3)], axis=1)
    np.testing.assert_allclose(np.asarray(preact)[..., 12:], pooled, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out), np.maximum(np.asarray(preact), 0))


# -------------------------------------------------------------------------------------------- ViT

SMALL_VIT = dict(patch_size=2, hidden=32, depth=2, heads=4, mlp_dim=64)
DIGITS = tiny_image_batch()  # 8 examples of 8x8x1: 16 patches of 2x2


@functools.cache
def _small_vit_run():
    """``(model, initial variables, images, eval Outputs)`` of a small ViT on :data:`DIGITS` (one compile)."""
    model = models.get("vit", num_classes=NUM_CLASSES, **SMALL_VIT)
    x = jnp.asarray(DIGITS["image"])

    @jax.jit
    def run(key, x):
        variables = model.init(key, x)
        return variables, model.apply(variables, x, train=False)

    return (model, x, *run(_key(), x))


def _np_layer_norm(x, p, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_block(x, p, heads):
    """One pre-LN ViT block in float64 NumPy, from the paper's equations (2)-(3) and MHSA (appendix A)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    b, t, d = x.shape
    dh = d // heads
    y = _np_layer_norm(x, p["ln1"])
    a = p["attention"]

    def proj(name):  # [B, T, heads, dh]
        return np.einsum("btd,dhk->bthk", y, a[name]["kernel"]) + a[name]["bias"]

    q, k, v = proj("query"), proj("key"), proj("value")
    scores = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(dh)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    att = np.einsum("bhqs,bshk->bqhk", weights, v)
    x = x + np.einsum("bqhk,hkd->bqd", att, a["out"]["kernel"]) + a["out"]["bias"]
    y = _np_layer_norm(x, p["ln2"])
    h = y @ p["mlp_in"]["kernel"] + p["mlp_in"]["bias"]
    erf = np.vectorize(math.erf)
    h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))  # exact GELU
    return x + h @ p["mlp_out"]["kernel"] + p["mlp_out"]["bias"], weights


def test_vit_blocks_and_attention_match_numpy_reference():
    _, x, variables, out = _small_vit_run()
    feats = {k: np.asarray(v, np.float64) for k, v in out.features.items()}
    params = variables["params"]
    assert {k: v.shape for k, v in feats.items()} == {
        "embed": (8, 17, 32), "block1": (8, 17, 32), "block2": (8, 17, 32),
        "block1_attention": (8, 4, 17, 17), "block2_attention": (8, 4, 17, 17),
        "tokens": (8, 17, 32), "pooled": (8, 32),
    }
    # Embedding: patch conv (stride = patch) on 2x2 patches in row-major order, class token first.
    kernel = np.asarray(params["patch_embed"]["kernel"], np.float64)  # [2, 2, 1, 32]
    patches = np.asarray(x, np.float64).reshape(8, 4, 2, 4, 2, 1).transpose(0, 1, 3, 2, 4, 5).reshape(8, 16, 4)
    embed = patches @ kernel.reshape(4, 32) + np.asarray(params["patch_embed"]["bias"])
    embed = np.concatenate([np.broadcast_to(np.asarray(params["cls_token"]), (8, 1, 32)), embed], axis=1)
    embed = embed + np.asarray(params["pos_embedding"])
    np.testing.assert_allclose(feats["embed"], embed, rtol=1e-4, atol=1e-5)
    previous = feats["embed"]
    for i in (1, 2):
        block, weights = _np_block(previous, params[f"encoder_block{i}"], heads=4)
        np.testing.assert_allclose(feats[f"block{i}_attention"], weights, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(feats[f"block{i}"], block, rtol=1e-4, atol=1e-4)
        previous = feats[f"block{i}"]
    tokens = _np_layer_norm(feats["block2"], jax.tree.map(np.asarray, params["final_ln"]))
    np.testing.assert_allclose(feats["tokens"], tokens, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(feats["pooled"], feats["tokens"][:, 0])


def test_vit_attention_rows_sum_to_one_and_logits_float32():
    _, _, _, out = _small_vit_run()
    for i in (1, 2):
        weights = np.asarray(out.features[f"block{i}_attention"])
        assert np.all(weights >= 0)
        np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    assert out.logits.shape == (8, NUM_CLASSES) and out.logits.dtype == jnp.float32
    # The head starts at zero (as in the official ViT), so an untrained ViT predicts uniformly.
    np.testing.assert_array_equal(out.logits, 0.0)
    assert out.model_state == {}


def test_vit_bfloat16_compute():
    model = models.get("vit", num_classes=NUM_CLASSES, dtype=jnp.bfloat16, **SMALL_VIT)
    _, x, variables, _ = _small_vit_run()  # the float32 model's variables fit the bf16 model
    out = jax.jit(functools.partial(model.apply, train=True))(variables, x)
    assert out.logits.dtype == jnp.float32
    weights = out.features["block2_attention"]
    assert weights.dtype == jnp.bfloat16 and out.features["tokens"].dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(out.features["tokens"].astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(weights, np.float32).sum(-1), 1.0, atol=3e-2)


@pytest.mark.parametrize(
    "patch_size, shape, size",
    [(3, CIFAR.shape, "32x32"), (3, (2, 8, 8, 1), "8x8"), (8, (2, 8, 12, 1), "8x12"), (5, (2, 10, 8, 3), "10x8")],
)
def test_vit_patch_size_must_divide_image_size(patch_size, shape, size):
    model = models.get("vit", num_classes=10, patch_size=patch_size, hidden=16, depth=1, heads=2, mlp_dim=16)
    with pytest.raises(ValueError, match=rf"patch_size={patch_size} does not divide the image size {size}"):
        jax.eval_shape(model.init, _key(), jax.ShapeDtypeStruct(shape, jnp.float32))


def test_vit_refuses_another_image_size_than_initialized():
    model, _, variables, _ = _small_vit_run()
    with pytest.raises(ValueError, match=r"initialized for 16 patches.*got 64 patches.*\(2, 16, 16, 1\)"):
        jax.eval_shape(functools.partial(model.apply, train=False), variables,
                       jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.float32))
    with pytest.raises(ValueError, match=r"initialized for 1-channel images, got 3 channels"):
        jax.eval_shape(functools.partial(model.apply, train=False), variables,
                       jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden": 32, "heads": 3}, r"heads must divide hidden, got hidden=32, heads=3"),
        ({"patch_size": 0}, r"patch_size must be an integer >= 1, got patch_size=0"),
        ({"depth": 2.5}, r"depth must be an integer"),
        ({"mlp_dim": -1}, r"mlp_dim must be an integer >= 1"),
        ({"dropout_rate": 1.0}, r"dropout_rate must lie in \[0, 1\)"),
    ],
)
def test_vit_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.get("vit", num_classes=10, **kwargs)


# ------------------------------------------------------ heterogeneous distillation: ViT -> resnet8


def test_kd_train_step_from_vit_teacher_to_resnet_student():
    """``ce + kd`` in the jitted train step with a ViT teacher and a resnet8 student on 8x8 digits; both
    terms equal a NumPy recomputation from the two models' logits."""
    batch = DIGITS
    teacher, _, tvars, tout = _small_vit_run()
    student = models.get("resnet8", num_classes=NUM_CLASSES)
    # A non-zero head, so the teacher's predictions are not uniform (the official init is zero); the
    # teacher's logits are then its pooled class-token embedding times that head.
    head = np.random.default_rng(2).standard_normal((SMALL_VIT["hidden"], NUM_CLASSES)).astype(np.float32)
    tvars = jax.tree.map(lambda a: a, tvars)
    tvars["params"]["head"] = {"kernel": jnp.asarray(head), "bias": jnp.zeros(NUM_CLASSES)}
    zt = np.asarray(tout.features["pooled"], np.float64) @ head
    svars = _filled(jax.eval_shape(student.init, _key(), batch["image"]))
    state = jaxkd.create(
        student=student, teacher=teacher, teacher_variables=tvars, student_variables=svars,
        method=methods.parse("ce + kd"), tx=optax.sgd(0.05, momentum=0.9), sample_batch=batch,
        rng=jax.random.PRNGKey(0),
    )
    zs = jax.jit(functools.partial(student.apply, train=True))(svars, batch["image"]).logits
    zs = np.asarray(zs, np.float64)
    assert np.ptp(zt) > 0.1
    state, metrics = jaxkd.make_train_step(donate=False)(state, batch)

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    t = 4.0  # methods.kd's default temperature
    log_pt, log_ps = log_softmax(zt / t), log_softmax(zs / t)
    expected_kd = t**2 * np.mean(np.sum(np.exp(log_pt) * (log_pt - log_ps), -1))
    np.testing.assert_allclose(float(metrics["kd"]), expected_kd, rtol=1e-4)
    expected_ce = -np.mean(log_softmax(zs)[np.arange(len(zs)), batch["label"]])
    np.testing.assert_allclose(float(metrics["loss"]), expected_ce + expected_kd, rtol=1e-4)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), svars["params"],
                                            jax.device_get(state.student.params))))
    # The frozen teacher is untouched.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen["teacher"].params), tvars["params"])
