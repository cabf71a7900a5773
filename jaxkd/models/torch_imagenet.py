"""Key maps from torchvision's ImageNet state dicts to the variables of jaxkd's ``resnet18``, ``resnet34``,
``resnet50`` and ``mobilenet_v2`` (:mod:`jaxkd.models.imagenet_resnet`, :mod:`jaxkd.models.imagenet_mobilenetv2`).

``KEY_MAPS[name](template_variables)`` returns ``{torch_key: (path, transform)}``: the torchvision
``state_dict()`` key (e.g. ``"layer2.0.downsample.0.weight"``), the path of the variable it fills in the
template's tree (``("params", "layer2_0", "downsample_conv", "kernel")``) and the NumPy function that turns the
PyTorch array into the Flax one. The generic loader (:func:`jaxkd.models.load_torch`) unwraps a checkpoint,
checks keys and shapes against this map and applies it; ``num_batches_tracked`` has no counterpart (Flax's
BatchNorm keeps no step count) and is ignored there.

Conventions (torchvision ``resnet.py`` / ``mobilenetv2.py``, github.com/pytorch/vision):

* ``Conv2d.weight`` ``[out, in / groups, kh, kw]`` -> ``nn.Conv`` kernel ``[kh, kw, in / groups, out]``
  (:func:`conv_kernel`; a depthwise ``[C, 1, 3, 3]`` weight becomes ``[3, 3, 1, C]``, what ``nn.Conv`` with
  ``feature_group_count = C`` holds);
* ``Linear.weight`` ``[out, in]`` -> ``nn.Dense`` kernel ``[in, out]`` (:func:`linear_kernel`);
* ``BatchNorm2d`` ``weight`` / ``bias`` / ``running_mean`` / ``running_var`` -> ``scale`` / ``bias`` (params)
  and ``mean`` / ``var`` (batch_stats), unchanged (:func:`identity`); both frameworks use eps 1e-5.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from jaxkd.models.torch_load import conv_kernel, identity, linear_kernel

__all__ = ["KEY_MAPS"]

Path = tuple[str, ...]
KeyMap = dict[str, tuple[Path, Callable[[np.ndarray], np.ndarray]]]


#: A Flax leaf name -> (the PyTorch parameter name, transform), by the kind of layer it belongs to.
_CONV = {"kernel": ("weight", conv_kernel)}
_DENSE = {"kernel": ("weight", linear_kernel), "bias": ("bias", identity)}
_BN = {
    "scale": ("weight", identity),
    "bias": ("bias", identity),
    "mean": ("running_mean", identity),
    "var": ("running_var", identity),
}


def _leaves(template: Mapping[str, Any]) -> list[Path]:
    """The paths of the template's ``params`` and ``batch_stats`` leaves (``intermediates`` etc. skipped)."""
    paths: list[Path] = []

    def walk(node, path):
        if isinstance(node, Mapping):
            for key, child in node.items():
                walk(child, (*path, str(key)))
        else:
            paths.append(path)

    for collection in ("params", "batch_stats"):
        if collection in template:
            walk(template[collection], (collection,))
    return paths


def _key_map(template: Mapping[str, Any], torch_module: Callable[[Path], str], classifier: str) -> KeyMap:
    """Every leaf of ``template``, named ``torch_module(its module path) + "." + the PyTorch leaf name``. Inside
    the Dense module ``classifier`` the leaves are a Linear's; elsewhere a ``kernel`` is a Conv2d's weight and
    ``scale`` / ``bias`` / ``mean`` / ``var`` are a BatchNorm's (the CNNs' convolutions have no bias)."""
    out: KeyMap = {}
    for path in _leaves(template):
        module, leaf = path[1:-1], path[-1]
        table = _DENSE if module == (classifier,) else _CONV if leaf == "kernel" else _BN
        torch_leaf, transform = table[leaf]
        out[f"{torch_module(module)}.{torch_leaf}"] = (path, transform)
    return out


def _resnet_module(module: Path) -> str:
    """``("layer2_0", "downsample_conv") -> "layer2.0.downsample.0"``; ``("conv1",) -> "conv1"``."""
    if len(module) == 1:  # the stem's conv1 / bn1 and fc
        return module[0]
    block, layer = module
    stage, index = block.split("_")
    layer = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(layer, layer)
    return f"{stage}.{index}.{layer}"


def resnet_key_map(template: Mapping[str, Any]) -> KeyMap:
    """torchvision ``resnet18`` / ``resnet34`` / ``resnet50`` -> :class:`~jaxkd.models.imagenet_resnet.ImageNetResNet`."""
    return _key_map(template, _resnet_module, classifier="fc")


#: Inside an ``InvertedResidual``'s ``conv`` Sequential: with the expansion (t != 1) and without it (t = 1).
_MBV2_EXPANDED = {
    "expand_conv": "conv.0.0", "expand_bn": "conv.0.1", "depthwise_conv": "conv.1.0", "depthwise_bn": "conv.1.1",
    "project_conv": "conv.2", "project_bn": "conv.3",
}
_MBV2_PLAIN = {"depthwise_conv": "conv.0.0", "depthwise_bn": "conv.0.1", "project_conv": "conv.1", "project_bn": "conv.2"}


def mobilenet_v2_key_map(template: Mapping[str, Any]) -> KeyMap:
    """torchvision ``mobilenet_v2`` -> :class:`~jaxkd.models.imagenet_mobilenetv2.ImageNetMobileNetV2`."""
    params = template["params"]
    head = 1 + sum(1 for name in params if name.startswith("block"))  # features.{head}: after the blocks
    top_level = {"stem_conv": "features.0.0", "stem_bn": "features.0.1", "head_conv": f"features.{head}.0",
                 "head_bn": f"features.{head}.1", "fc": "classifier.1"}

    def torch_module(module: Path) -> str:
        if len(module) == 1:
            return top_level[module[0]]
        block, layer = module
        table = _MBV2_EXPANDED if "expand_conv" in params[block] else _MBV2_PLAIN
        return f"features.{block[len('block'):]}.{table[layer]}"

    return _key_map(template, torch_module, classifier="fc")


#: jaxkd model name -> key map builder ``fn(template_variables) -> {torch_key: (path, transform)}``.
KEY_MAPS: dict[str, Callable[[Mapping[str, Any]], KeyMap]] = {
    "resnet18": resnet_key_map,
    "resnet34": resnet_key_map,
    "resnet50": resnet_key_map,
    "mobilenet_v2": mobilenet_v2_key_map,
}
