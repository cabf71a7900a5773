"""torchvision's ImageNet resnet18/34/50 and mobilenet_v2: parameter counts, key maps, equal logits.

The reference is torchvision's own definitions, transcribed into ``tests/torch_reference/torchvision_models.py``
(torchvision cannot be installed here; that file cites the source commits). With random weights, random
BatchNorm statistics and eval mode, jaxkd's models given the torchvision state dict through
:mod:`jaxkd.models.torch_imagenet`'s key maps must return the same logits and the same stage features.
Only eval-mode forwards are compiled, on 2 small images and 10 classes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import models
from jaxkd.models.torch_imagenet import KEY_MAPS

torch = pytest.importorskip("torch")
tv = pytest.importorskip("tests.torch_reference.torchvision_models")

NAMES = ("resnet18", "resnet34", "resnet50", "mobilenet_v2")
#: torchvision's published parameter counts at 1000 classes (the model documentation's "num_params").
PUBLISHED = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "mobilenet_v2": 3_504_872}
NUM_CLASSES = 10


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _template(name, num_classes, size=64):
    model = models.get(name, num_classes=num_classes)
    return model, jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))


@pytest.fixture
def load():
    """``load(name, state_dict, num_classes) -> variables`` through ``jaxkd.models.load_torch``."""

    def load_(name, state_dict, num_classes):
        return models.load_torch(name, state_dict, num_classes=num_classes, input_shape=(1, 64, 64, 3))

    return load_


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_equal_torchvision(name):
    _, template = _template(name, 1000)
    torch_model = tv.BUILDERS[name](num_classes=1000)
    assert _count(template["params"]) == PUBLISHED[name]
    assert sum(p.numel() for p in torch_model.parameters()) == PUBLISHED[name]


@pytest.mark.parametrize("name", NAMES)
def test_key_map_covers_torchvision_state_dict(name):
    _, template = _template(name, NUM_CLASSES)
    key_map = KEY_MAPS[name](template)
    state_keys = set(tv.BUILDERS[name](num_classes=NUM_CLASSES).state_dict())
    assert set(key_map) == {k for k in state_keys if not k.endswith("num_batches_tracked")}
    assert set(tv.TORCHVISION_KEYS.get(name, [])) <= state_keys
    # Every variable of the model is filled exactly once.
    paths = [path for path, _ in key_map.values()]
    n_leaves = len(jax.tree.leaves(template["params"])) + len(jax.tree.leaves(template["batch_stats"]))
    assert len(set(paths)) == len(paths) == n_leaves


def _torch_model(name, seed=0):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = tv.BUILDERS[name](num_classes=NUM_CLASSES)
    tv.randomize_batch_norms(model, generator)
    with torch.no_grad():  # a classifier with a non-zero bias, so its transpose and bias are both tested
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, 0.05, generator=generator)
                m.bias.uniform_(-0.5, 0.5, generator=generator)
    return model.eval()


@pytest.mark.parametrize(
    "name, size",
    [("resnet18", 66), ("mobilenet_v2", 70), ("resnet50", 64)],  # odd maps after the strides test the padding
)
def test_equal_logits_with_torchvision_weights(name, size, load):
    torch_model = _torch_model(name)
    x = np.random.default_rng(1).standard_normal((2, size, size, 3)).astype(np.float32)
    captured = {}
    if name.startswith("resnet"):
        # torchdistill's ReviewKD hooks the input of layer4[-1].relu: its last call sees the residual sum
        # (read before the call: the ReLU is in place).
        def hook(module, inputs):
            captured["stage4_preact"] = inputs[0].detach().clone()

        torch_model.layer4[-1].relu.register_forward_pre_hook(hook)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    model = models.get(name, num_classes=NUM_CLASSES)
    variables = load(name, torch_model.state_dict(), NUM_CLASSES)
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(x))
    _assert_close(out.logits, expected)
    if captured:
        _assert_close(out.features["stage4_preact"], captured["stage4_preact"].permute(0, 2, 3, 1).numpy())


def _assert_close(actual, expected):
    """float32 agreement relative to the array's scale (random BN statistics let resnet50's residual stream
    grow to ~500, where float32 summation order alone moves values by ~1e-3)."""
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-4, atol=1e-5 * float(np.abs(expected).max()))


def test_features_and_shapes_per_stage():
    model, _ = _template("resnet18", NUM_CLASSES)
    out = jax.eval_shape(
        lambda x: model.apply(model.init(jax.random.key(0), x), x, train=False),
        jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32),
    )
    shapes = {k: v.shape for k, v in out.features.items()}
    assert shapes["stem"] == (1, 56, 56, 64)
    for stage, (hw, c) in enumerate([(56, 64), (28, 128), (14, 256), (7, 512)], start=1):
        assert shapes[f"stage{stage}"] == shapes[f"stage{stage}_preact"] == (1, hw, hw, c)
    assert shapes["pooled"] == (1, 512)
    mbv2, _ = _template("mobilenet_v2", NUM_CLASSES)
    out = jax.eval_shape(
        lambda x: mbv2.apply(mbv2.init(jax.random.key(0), x), x, train=False),
        jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32),
    )
    shapes = {k: v.shape for k, v in out.features.items()}
    assert [shapes[f"stage{i}"] for i in range(1, 5)] == [(1, 56, 56, 24), (1, 28, 28, 32), (1, 14, 14, 96),
                                                          (1, 7, 7, 320)]
    assert shapes["prepool"] == (1, 7, 7, 1280) and shapes["pooled"] == (1, 1280)


def test_mobilenet_v2_bad_dropout_rate():
    with pytest.raises(ValueError, match="dropout_rate"):
        models.get("mobilenet_v2", num_classes=10, dropout_rate=1.0)
