"""``jaxkd.models.load_torch`` against RepDistiller's official PyTorch models.

The reference is ``tests/torch_reference/repdistiller.py``, RepDistiller's ``models/`` transcribed (commit
b84f547c5db6a35318d4671d7d5c4de74c822403 of https://github.com/HobbitLong/RepDistiller). For each family,
the smallest member is built in PyTorch with random weights and random BatchNorm running statistics (so the
eval-mode normalization matters), run in eval mode, and its ``state_dict`` loaded into the jaxkd model, whose
eval-mode logits must equal PyTorch's; every member of every family (all of RepDistiller's ``model_dict``)
loads without a missing, extra or misshapen key and has the official parameter count.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxkd import models  # noqa: E402
from jaxkd.models import torch_load  # noqa: E402
from tests.torch_reference import repdistiller as official  # noqa: E402

NUM_CLASSES = 10


def _randomize(module: "torch.nn.Module", seed: int) -> "torch.nn.Module":
    """Random weights at a scale that keeps activations O(1) through the depth, random BN affine parameters and
    running statistics; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / p[0].numel()) ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return module.eval()


def _official(name: str, seed: int = 0, num_classes: int = NUM_CLASSES):
    return _randomize(official.build(name, num_classes), seed)


def _logits_pair(name: str, variables, torch_model, size: int = 32, *, hooks=None):
    """``(jaxkd logits, PyTorch logits)`` of the same random NCHW batch, both in eval mode; with ``hooks``
    (``{feature name: (torch submodule, fn of its output)}``), also ``(jaxkd features, PyTorch features)`` (NHWC)."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    seen = {}
    handles = [module.register_forward_hook(lambda m, i, o, feature=feature, fn=fn: seen.__setitem__(feature, fn(o)))
               for feature, (module, fn) in (hooks or {}).items()]
    with torch.no_grad():
        expected = torch_model(x).numpy()
    for handle in handles:
        handle.remove()
    model = models.get(name, num_classes=NUM_CLASSES)
    out = jax.jit(lambda v, images: model.apply(v, images, train=False))(
        variables, jnp.asarray(x.permute(0, 2, 3, 1).numpy()))
    if hooks is None:
        return np.asarray(out.logits), expected
    nhwc = {k: (v.permute(0, 2, 3, 1) if v.ndim == 4 else v).numpy() for k, v in seen.items()}
    return np.asarray(out.logits), expected, {k: np.asarray(out.features[k]) for k in nhwc}, nhwc


def _assert_same_logits(got, expected):
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * max(1.0, float(np.abs(expected).max())))
    assert np.abs(expected).max() > 0.1  # not a trivially small output


# ------------------------------------------------------------------------------------------ equal logits

# The smallest member of each family; the way the state dict is passed varies (wrapper, file, prefix).
FAMILIES = {
    "resnet8": "model_wrapper",
    "resnet8x4": "state_dict_wrapper",
    "wrn_16_1": "safetensors",
    "vgg8": "data_parallel",
    "MobileNetV2": "model_wrapper",
    "ShuffleV1": "model_wrapper",
    "ShuffleV2": "plain",
}


def _as_checkpoint(torch_model, how: str, tmp_path):
    sd = torch_model.state_dict()
    if how == "model_wrapper":  # RepDistiller's / mdistiller's ckpt_epoch_240.pth layout
        return {"epoch": 240, "model": sd, "accuracy": torch.tensor(73.0)}
    if how == "state_dict_wrapper":
        return {"state_dict": sd}
    if how == "data_parallel":
        return {f"module.{k}": v for k, v in sd.items()}
    if how == "safetensors":
        from safetensors.numpy import save_file

        path = tmp_path / "teacher.safetensors"
        save_file({k: v.numpy() for k, v in sd.items()}, str(path))  # num_batches_tracked included: ignored
        return path
    return sd


@pytest.mark.parametrize("name", sorted(set(FAMILIES) - {"vgg8"}))
def test_eval_logits_equal_the_official_model(name, tmp_path):
    torch_model = _official(name)
    variables = models.load_torch(name, _as_checkpoint(torch_model, FAMILIES[name], tmp_path), num_classes=NUM_CLASSES)
    _assert_same_logits(*_logits_pair(name, variables, torch_model))


def _same_features(got, expected):
    assert set(got) == set(expected)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=1e-4 * max(1.0, float(np.abs(expected[k]).max())),
                                   err_msg=k)


def test_vgg8_logits_and_features_equal_the_official_model(tmp_path):
    """vgg8 through a DataParallel state dict; its sown features are the official ``is_feat`` list: ``stem`` =
    ``relu(block0(x))``, ``stage<k>_preact`` = ``block<k>(.)`` (a BatchNorm output), ``stage<k>`` its ReLU,
    ``pooled`` = ``pool4`` flattened."""
    torch_model = _official("vgg8")
    variables = models.load_torch("vgg8", _as_checkpoint(torch_model, FAMILIES["vgg8"], tmp_path), num_classes=NUM_CLASSES)
    hooks = {"stem": (torch_model.block0, torch.relu), "pooled": (torch_model.pool4, lambda o: o.flatten(1))}
    for k in range(1, 5):
        hooks[f"stage{k}_preact"] = (getattr(torch_model, f"block{k}"), lambda o: o)
        hooks[f"stage{k}"] = (getattr(torch_model, f"block{k}"), torch.relu)
    got, expected, got_features, features = _logits_pair("vgg8", variables, torch_model, hooks=hooks)
    _assert_same_logits(got, expected)
    _same_features(got_features, features)


def test_resnet50_logits_from_a_pth_file(tmp_path):
    """The CIFAR ResNet50 on 8x8 images (its pooling is adaptive: any size), through a saved ``.pth``."""
    torch_model = _official("ResNet50")
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": torch_model.state_dict()}, path)
    variables = models.load_torch("ResNet50", str(path), num_classes=NUM_CLASSES)
    # Its features: stem = relu(bn1(conv1(x))), stage<k> = layer<k>(.), pooled = avgpool flattened.
    hooks = {"stem": (torch_model.bn1, torch.relu), "pooled": (torch_model.avgpool, lambda o: o.flatten(1)),
             **{f"stage{k}": (getattr(torch_model, f"layer{k}"), lambda o: o) for k in range(1, 5)}}
    got, expected, got_features, features = _logits_pair("ResNet50", variables, torch_model, size=8, hooks=hooks)
    _assert_same_logits(got, expected)
    _same_features(got_features, features)
    # The variables have the structure model.init gives.
    abstract = jax.eval_shape(models.get("ResNet50", num_classes=NUM_CLASSES).init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))
    assert jax.tree.structure(abstract) == jax.tree.structure(variables)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(lambda a: (a.shape, a.dtype), variables)


# Slow (the suite's time): traces all 22 models; one per family loads with equal logits in the fast suite.
@pytest.mark.slow
def test_every_model_dict_entry_loads_with_the_official_parameter_count():
    """All 22 of RepDistiller's ``model_dict`` names: the jaxkd model has the official definition's parameter
    count, and its state dict (random values) loads with every key and shape accounted for; the BatchNorm
    statistics land in ``batch_stats`` (buffers are not parameters in either framework)."""
    for name in official.MODEL_DICT_NAMES:
        torch_model = official.build(name, NUM_CLASSES)
        variables = models.load_torch(name, torch_model.state_dict(), num_classes=NUM_CLASSES)
        count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))
        assert count == sum(p.numel() for p in torch_model.parameters()), name
        buffers = sum(b.numel() for k, b in torch_model.state_dict().items() if "running_" in k)
        assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["batch_stats"])) == buffers, name
    # The published sizes at 100 classes (RepDistiller / CRD Table 1-2, in millions) for the new models.
    for name, millions in {"vgg8": 3.96, "vgg13": 9.46, "ResNet50": 23.71, "wrn_16_1": 0.18}.items():
        count = sum(p.numel() for p in official.build(name, 100).parameters())
        assert abs(count / 1e6 - millions) < 0.01, name


def test_official_names_are_aliases_of_the_jaxkd_models():
    for official_name, jaxkd_name in {"MobileNetV2": "mobilenetv2", "ShuffleV1": "shufflenetv1",
                                      "ShuffleV2": "shufflenetv2", "ResNet50": "cifar_resnet50"}.items():
        assert models._REGISTRY[official_name] is models._REGISTRY[jaxkd_name]
        assert torch_load.key_maps()[official_name] is not None and jaxkd_name in torch_load.key_maps()


# ------------------------------------------------------------------------------------------ bad input


def _resnet8_state(num_classes=NUM_CLASSES):
    return {k: v.numpy() for k, v in official.build("resnet8", num_classes).state_dict().items()}


def test_missing_and_extra_keys_are_named_with_the_closest_key():
    state = _resnet8_state()
    missing = dict(state)
    del missing["layer2.0.bn2.running_var"]
    with pytest.raises(ValueError, match=r"missing key 'layer2\.0\.bn2\.running_var' \(closest key in the "
                                         r"checkpoint: 'layer3\.0\.bn2\.running_var'\)"):
        models.load_torch("resnet8", missing, num_classes=NUM_CLASSES)
    extra = {**state, "layer1.0.bn1.running_std": state["layer1.0.bn1.running_var"]}
    with pytest.raises(ValueError, match=r"unexpected key 'layer1\.0\.bn1\.running_std' \(closest key of resnet8: "
                                         r"'layer1\.0\.bn1\.running_\w+'\)"):
        models.load_torch("resnet8", extra, num_classes=NUM_CLASSES)
    # A close architecture: wrn_16_2 has one key more than wrn_16_1 (the first block's shortcut, 16 -> 32 channels).
    with pytest.raises(ValueError, match=r"unexpected key 'block1\.layer\.0\.convShortcut\.weight' .*; the "
                                         r"checkpoint's keys and convolution shapes are those of \['wrn_16_2'\]"):
        models.load_torch("wrn_16_1", official.build("wrn_16_2", NUM_CLASSES).state_dict(), num_classes=NUM_CLASSES)


def test_a_shape_mismatch_names_the_key_and_both_shapes():
    state = _resnet8_state()
    state["layer1.0.conv2.weight"] = state["layer1.0.conv2.weight"][:, :8]
    with pytest.raises(ValueError, match=r"'layer1\.0\.conv2\.weight' has shape \(16, 8, 3, 3\) \(\(3, 3, 8, 16\) in "
                                         r"jaxkd's layout\), resnet8 expects \(3, 3, 16, 16\) at "
                                         r"params/stage1_block0/conv2/kernel"):
        models.load_torch("resnet8", state, num_classes=NUM_CLASSES)
    state["layer1.0.conv2.weight"] = state["layer1.0.conv2.weight"].reshape(16, -1)  # another rank
    with pytest.raises(ValueError, match=r"'layer1\.0\.conv2\.weight' has shape \(16, 72\) \(\(16, 72\) in "
                                         r"jaxkd's layout\), resnet8 expects \(3, 3, 16, 16\)"):
        models.load_torch("resnet8", state, num_classes=NUM_CLASSES)


def test_another_num_classes_names_both_counts():
    with pytest.raises(ValueError, match=r"classifier 'fc\.(weight|bias)' has 100 classes, but num_classes=10 was "
                                         r"asked; pass num_classes=100"):
        models.load_torch("resnet8", _resnet8_state(num_classes=100), num_classes=10)


def test_a_checkpoint_of_another_architecture_is_named_as_such():
    """Deeper (resnet56 weights for resnet20), another family (vgg8 for resnet8), wider (resnet8x4 for resnet8: a
    few keys differ) and same keys at other widths (an official ``ResNet(8, [32, 32, 64, 128])``, a width no
    registered model has): each says the checkpoint is not the model, and suggests the matching ones."""
    cases = [
        ("resnet20", official.build("resnet56", NUM_CLASSES), r"180 of its 287 keys are not resnet20's.*match it: "
                                                              r"\['resnet56'\]"),
        ("resnet8", official.build("vgg8", NUM_CLASSES), r"32 of its 32 keys are not resnet8's.*\['vgg8'\]"),
        ("resnet8", official.build("resnet8x4", NUM_CLASSES), r"5 of its 52 keys are not resnet8's.*\['resnet8x4'\]"),
        ("MobileNetV2", official.build("ShuffleV2", NUM_CLASSES), r"\['ShuffleV2', 'shufflenetv2'\]"),
        ("resnet8", official.ResNet(8, [32, 32, 64, 128], num_classes=NUM_CLASSES),
         r"arrays have other shapes than resnet8's \(e\.g\. 'layer1\.0\.conv1\.weight': \(32, 32, 3, 3\) in the checkpoint\); "
         r"no registered architecture"),
    ]
    for name, torch_model, message in cases:
        with pytest.raises(ValueError, match=rf"the checkpoint is not a {name}: .*{message}"):
            models.load_torch(name, torch_model.state_dict(), num_classes=NUM_CLASSES)


def test_unreadable_inputs_are_refused(tmp_path, monkeypatch):
    state = _resnet8_state()
    with pytest.raises(ValueError, match=r"no PyTorch key map for 'vit'; it reads: \[.*'resnet8'"):
        models.load_torch("vit", state, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match=r"load_torch unknown model 'resnet9'; it reads: \[.*'vgg8'"):
        models.load_torch("resnet9", state, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="num_classes"):
        models.load_torch("resnet8", state, num_classes=0)
    with pytest.raises(ValueError, match=r"entry 'fc\.bias' is a str, not an array"):
        models.load_torch("resnet8", {**state, "fc.bias": "zeros"}, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="holds no tensors"):
        models.load_torch("resnet8", {"model": {}}, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match=r"reads \.pth, \.pt or \.safetensors files, got '.*teacher\.npz'"):
        models.load_torch("resnet8", str(tmp_path / "teacher.npz"), num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="no such checkpoint file"):
        models.load_torch("resnet8", tmp_path / "absent.pth", num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="a state dict .* got int"):
        models.load_torch("resnet8", 3, num_classes=NUM_CLASSES)
    # A pickle that holds more than tensors: torch.load(weights_only=True) refuses it, and the message says what to do.
    path = tmp_path / "pickled.pth"
    torch.save({"model": official.build("resnet8", NUM_CLASSES).state_dict(), "opt": _Options()}, path)
    with pytest.raises(ValueError, match=r"weights_only=True\) failed .* load it with torch\.load\(\.\.\., "
                                         r"weights_only=False\) yourself"):
        models.load_torch("resnet8", path, num_classes=NUM_CLASSES)
    # A .pth without torch installed: the error names the extra to install.
    torch.save(official.build("resnet8", NUM_CLASSES).state_dict(), tmp_path / "plain.pth")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install 'jaxkd\[torch\]'"):
        models.load_torch("resnet8", tmp_path / "plain.pth", num_classes=NUM_CLASSES)


class _Options:
    """A stand-in for the argparse namespace some training scripts pickle next to the weights."""


def test_library_never_imports_torch(tmp_path):
    """``jaxkd.models.load_torch`` reads a ``.safetensors`` checkpoint in a process where torch was never imported."""
    from safetensors.numpy import save_file

    path = tmp_path / "resnet8.safetensors"
    save_file(_resnet8_state(), str(path))
    code = (
        "import sys, jaxkd, jaxkd.models\n"
        f"v = jaxkd.models.load_torch('resnet8', {str(path)!r}, num_classes={NUM_CLASSES})\n"
        "assert v['params']['fc']['kernel'].shape == (64, 10)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_half_precision_tensors_load_as_float32():
    """bfloat16 / float16 tensors (no NumPy view) are widened; the variables are float32 with the same values."""
    torch_model = official.build("resnet8", NUM_CLASSES)
    state = {k: (v.to(torch.bfloat16) if k.startswith("layer1") else v.half()) if v.is_floating_point() else v
             for k, v in torch_model.state_dict().items()}
    variables = models.load_torch("resnet8", state, num_classes=NUM_CLASSES)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {np.dtype(np.float32)}
    np.testing.assert_array_equal(np.asarray(variables["params"]["fc"]["kernel"]), state["fc.weight"].float().numpy().T)
    np.testing.assert_array_equal(np.asarray(variables["batch_stats"]["stage1_block0"]["bn1"]["var"]),
                                  state["layer1.0.bn1.running_var"].float().numpy())
