"""PyTorch ``state_dict`` key maps of RepDistiller's / mdistiller's CIFAR models, for :func:`jaxkd.models.load_torch`.

Each entry of :data:`KEY_MAPS` is ``fn(template_variables) -> {torch_key: (path_tuple, transform)}`` for one
registered architecture: ``torch_key`` is a key of the official model's ``state_dict()`` (RepDistiller,
https://github.com/HobbitLong/RepDistiller, ``models/resnet.py``, ``resnetv2.py``, ``wrn.py``, ``vgg.py``,
``mobilenetv2.py``, ``ShuffleNetv1.py``, ``ShuffleNetv2.py``; mdistiller's ``mdistiller/models/cifar`` has the
same modules and keys), ``path_tuple`` the leaf of jaxkd's variables it fills and ``transform`` the
layout change (:mod:`jaxkd.models.torch_load`'s converters).

Every map is written the same way: walk the template's parameter modules (a convolution, a BatchNorm or a
Dense layer, recognised by their leaves) and translate each jaxkd module path into the official module's
``state_dict`` prefix; the layer type gives the tensor names (``weight``/``bias``, and for a BatchNorm
``running_mean``/``running_var`` into ``batch_stats``). The block counts come from the template, so one map
serves a whole family (resnet8 … resnet110).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Mapping

from jaxkd.models.torch_load import KeyMap, module_entries

# ------------------------------------------------------------------ path translators, one per family


def _resnet(path: tuple[str, ...]) -> str:
    """``models/resnet.py``: ``conv1``/``bn1`` stem, ``layer{s}.{b}`` blocks with a ``downsample`` Sequential."""
    return _blocks(path, stem=("conv1", "bn1"), layer="layer{s}.{b}",
                   shortcut=("downsample.0", "downsample.1"), fc="fc")


def _resnet50(path: tuple[str, ...]) -> str:
    """``models/resnetv2.py``: as resnet.py, but the shortcut Sequential is ``shortcut`` and the head ``linear``."""
    return _blocks(path, stem=("conv1", "bn1"), layer="layer{s}.{b}",
                   shortcut=("shortcut.0", "shortcut.1"), fc="linear")


def _wrn(path: tuple[str, ...]) -> str:
    """``models/wrn.py``: ``conv1`` stem, ``block{s}.layer.{b}`` blocks with ``convShortcut``, ``bn1`` final BN."""
    if path == ("final_bn",):
        return "bn1"
    return _blocks(path, stem=("conv1", None), layer="block{s}.layer.{b}", shortcut=("convShortcut", None), fc="fc")


def _blocks(path, *, stem, layer, shortcut, fc) -> str:
    top = path[0]
    if top == "stem_conv":
        return stem[0]
    if top == "stem_bn":
        return stem[1]
    if top == "fc":
        return fc
    match = re.fullmatch(r"stage(\d+)_block(\d+)", top)
    if match is None or len(path) != 2:
        raise KeyError(path)
    prefix = layer.format(s=match[1], b=match[2])
    leaf = {"shortcut_conv": shortcut[0], "shortcut_bn": shortcut[1]}.get(path[1], path[1])
    return f"{prefix}.{leaf}"


def _vgg(path: tuple[str, ...]) -> str:
    """``models/vgg.py``: ``block{k}`` Sequentials of ``[conv, bn, relu] * n`` minus the last ReLU, so layer ``i``'s
    convolution is entry ``3i`` and its BatchNorm ``3i + 1``; the head is ``classifier``."""
    if path == ("fc",):
        return "classifier"
    match = re.fullmatch(r"block(\d+)_(conv|bn)(\d+)", path[0])
    if match is None:
        raise KeyError(path)
    return f"block{match[1]}.{3 * int(match[3]) + (match[2] == 'bn')}"


_MOBILENET_BLOCK = {"expand_conv": 0, "expand_bn": 1, "depthwise_conv": 3, "depthwise_bn": 4,
                    "project_conv": 6, "project_bn": 7}


def _mobilenetv2(path: tuple[str, ...]) -> str:
    """``models/mobilenetv2.py``: ``conv1.{0,1}`` stem, ``blocks.{g}.{b}.conv.{i}`` (the Sequential
    ``[pw, bn, relu, dw, bn, relu, pw-linear, bn]``), ``conv2.{0,1}`` head, ``classifier.0``."""
    fixed = {("stem_conv",): "conv1.0", ("stem_bn",): "conv1.1", ("head_conv",): "conv2.0",
             ("head_bn",): "conv2.1", ("fc",): "classifier.0"}
    if path in fixed:
        return fixed[path]
    match = re.fullmatch(r"group(\d+)_block(\d+)", path[0])
    if match is None or len(path) != 2:
        raise KeyError(path)
    return f"blocks.{match[1]}.{match[2]}.conv.{_MOBILENET_BLOCK[path[1]]}"


def _shufflenet(path: tuple[str, ...], *, has_down_units: bool) -> str:
    """``models/ShuffleNetv1.py`` / ``ShuffleNetv2.py``: ``conv1``/``bn1`` stem, ``layer{s}.{i}`` units (V2, which
    ``has_down_units``: the down-sampling unit is ``layer{s}.0`` and basic unit ``b`` is ``layer{s}.{b + 1}``),
    V2's ``conv2``/``bn2`` head, ``linear``; unit layers keep their names (``conv1`` … ``bn5``)."""
    fixed = {("stem_conv",): "conv1", ("stem_bn",): "bn1", ("head_conv",): "conv2", ("head_bn",): "bn2",
             ("fc",): "linear"}
    if path in fixed:
        return fixed[path]
    match = re.fullmatch(r"stage(\d+)_(down|block)(\d+)?", path[0])
    if match is None or len(path) != 2:
        raise KeyError(path)
    unit = 0 if match[2] == "down" else int(match[3]) + has_down_units
    return f"layer{match[1]}.{unit}.{path[1]}"


def _shufflenet_map(template: Mapping[str, Any]) -> KeyMap:
    """Both ShuffleNets (V2 told apart by its ``stage{s}_down`` units)."""
    has_down_units = any(k.endswith("_down") for k in template["params"])
    return module_entries(template, functools.partial(_shufflenet, has_down_units=has_down_units))


def _from(translate: Callable[[tuple[str, ...]], str]) -> Callable[[Mapping[str, Any]], KeyMap]:
    def key_map(template: Mapping[str, Any]) -> KeyMap:
        return module_entries(template, translate)

    key_map.__doc__ = translate.__doc__
    return key_map


_RESNETS = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
            "resnet8x4", "resnet32x4")
_WRNS = ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")
_VGGS = ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")

#: registered model name (jaxkd's and RepDistiller's) -> ``fn(template_variables) -> {torch_key: (path, transform)}``.
KEY_MAPS: dict[str, Callable[[Mapping[str, Any]], KeyMap]] = {
    **{name: _from(_resnet) for name in _RESNETS},
    **{name: _from(_wrn) for name in _WRNS},
    **{name: _from(_vgg) for name in _VGGS},
    "cifar_resnet50": _from(_resnet50),
    "ResNet50": _from(_resnet50),
    "mobilenetv2": _from(_mobilenetv2),
    "MobileNetV2": _from(_mobilenetv2),
    "shufflenetv1": _shufflenet_map,
    "ShuffleV1": _shufflenet_map,
    "shufflenetv2": _shufflenet_map,
    "ShuffleV2": _shufflenet_map,
}
