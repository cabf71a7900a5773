"""Model zoo and the model contract.

``get(name, num_classes=...)`` builds a registered architecture as a :class:`Model`; every model
sows its named features into the ``"intermediates"`` collection (see :mod:`jaxkd.models.base`).

Registered names: the RepDistiller CIFAR ResNets (``resnet8`` … ``resnet110``, ``resnet8x4``,
``resnet32x4``; keyword arguments: none), Wide ResNets (``wrn_16_1``, ``wrn_16_2``, ``wrn_40_1``,
``wrn_40_2``; ``dropout_rate=0.0``), the CIFAR VGGs with BatchNorm ``vgg8`` … ``vgg19``, the CIFAR
``cifar_resnet50`` (also under RepDistiller's name ``ResNet50``), RepDistiller's CIFAR ``mobilenetv2``
(``mobile_half``, also ``MobileNetV2``), ``shufflenetv1`` (``ShuffleV1``) and ``shufflenetv2``
(``ShuffleV2``; keyword arguments: none; RepDistiller's names are registered too), the Vision Transformers
``vit`` and ``vit_tiny`` (``patch_size=4, hidden=192, depth=6, heads=3, mlp_dim=768, dropout_rate=0.0``;
``vit`` is the configurable family, ``vit_tiny`` the preset, both take the same keywords) and ``mlp``
(``hidden_sizes=(256, 256)``); torchvision's ImageNet ``resnet18``, ``resnet34``, ``resnet50`` (keyword
arguments: none) and ``mobilenet_v2`` (``dropout_rate=0.2``), whose torchvision state dicts load with
equal logits (:mod:`jaxkd.models.torch_imagenet`).

Published PyTorch checkpoints of these CIFAR models (RepDistiller's / mdistiller's ``ckpt_epoch_240.pth``):
:func:`load_torch` (:mod:`jaxkd.models.torch_load`).

Hugging Face checkpoints (llama, mistral, qwen2, qwen3, gemma2, gemma3_text, gpt2 and the mixtures of
experts qwen3_moe and mixtral): :func:`from_hf` and :func:`to_hf` (:mod:`jaxkd.models.hf`).
LoRA adapters on a model's projections (:mod:`jaxkd.models.lora`) and
int8 weight-only frozen models (:mod:`jaxkd.models.quantize`), both through qwix.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxkd.checks import check_int
from jaxkd.models.base import (
    Model,
    Outputs,
    from_linen,
    get_feature,
    merge_variables,
    split_variables,
)
from jaxkd.models.cifar_resnet import CIFAR_RESNETS, cifar_resnet
from jaxkd.models.cifar_resnet50 import cifar_resnet50
from jaxkd.models.imagenet_mobilenetv2 import imagenet_mobilenetv2
from jaxkd.models.imagenet_resnet import IMAGENET_RESNETS, imagenet_resnet
from jaxkd.models.mlp import MLP
from jaxkd.models.mobilenetv2 import mobilenetv2
from jaxkd.models.shufflenet import shufflenetv1, shufflenetv2
from jaxkd.models.vgg import VGGS, vgg
from jaxkd.models.vit import vit
from jaxkd.models.wide_resnet import WIDE_RESNETS, wide_resnet

__all__ = [
    "Model",
    "Outputs",
    "available",
    "from_hf",
    "from_linen",
    "get",
    "load_torch",
    "get_feature",
    "merge_variables",
    "split_variables",
    "to_hf",
]


def __getattr__(name: str) -> Any:
    # jaxkd.models.hf.from_hf / to_hf, imported on first use (safetensors stays out of ``import jaxkd``).
    if name in ("from_hf", "to_hf"):
        from jaxkd.models import hf

        return getattr(hf, name)
    # jaxkd.models.torch_load.load_torch, imported on first use (it never imports torch itself but on a .pth).
    if name == "load_torch":
        from jaxkd.models import torch_load

        return torch_load.load_torch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _mlp(
    *, num_classes: int, dtype: Any = jnp.float32, hidden_sizes: Sequence[int] = (256, 256)
) -> MLP:
    """An :class:`MLP`; ``hidden_sizes`` must be a (possibly empty) sequence of integers ``>= 1``."""
    if isinstance(hidden_sizes, (str, bytes)) or not isinstance(hidden_sizes, Sequence):
        raise ValueError(
            f"hidden_sizes must be a sequence of layer widths (integers >= 1), "
            f"got hidden_sizes={hidden_sizes!r}"
        )
    hidden_sizes = tuple(check_int(f"hidden_sizes[{i}]", h, low=1) for i, h in enumerate(hidden_sizes))
    return MLP(num_classes=num_classes, hidden_sizes=hidden_sizes, dtype=dtype)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    **{name: functools.partial(cifar_resnet, name) for name in CIFAR_RESNETS},
    **{name: functools.partial(wide_resnet, name) for name in WIDE_RESNETS},
    "mobilenetv2": mobilenetv2,
    "shufflenetv1": shufflenetv1,
    "shufflenetv2": shufflenetv2,
    # --- published CIFAR teachers (RepDistiller's model_dict): VGGs, the CIFAR ResNet50, official aliases ---
    **{name: functools.partial(vgg, name) for name in VGGS},
    "cifar_resnet50": cifar_resnet50,
    "ResNet50": cifar_resnet50,
    "MobileNetV2": mobilenetv2,
    "ShuffleV1": shufflenetv1,
    "ShuffleV2": shufflenetv2,
    # --- end published CIFAR teachers ---
    "vit": vit,
    "vit_tiny": vit,
    "mlp": _mlp,
    # torchvision's ImageNet models (jaxkd.models.imagenet_resnet / imagenet_mobilenetv2).
    **{name: functools.partial(imagenet_resnet, name) for name in IMAGENET_RESNETS},
    "mobilenet_v2": imagenet_mobilenetv2,
}


def available() -> list[str]:
    """The registered architecture names, sorted."""
    return sorted(_REGISTRY)


def get(name: str, *, num_classes: int, dtype: Any = jnp.float32, **kwargs: Any) -> Model:
    """Builds the registered architecture ``name`` as a :class:`Model`.

    Args:
      name: one of :func:`available`.
      num_classes: classifier outputs.
      dtype: compute dtype; parameters stay float32 and logits are returned in float32.
      **kwargs: architecture-specific options (``dropout_rate`` for WRNs, ``hidden_sizes`` for mlp,
        ``patch_size``, ``hidden``, ``depth``, ``heads``, ``mlp_dim``, ``dropout_rate`` for the ViTs).

    Raises:
      ValueError: ``name`` is not registered, ``num_classes`` is not an integer ``>= 1``, or an
        architecture option is out of range (``hidden_sizes`` entries must be integers ``>= 1``,
        ``dropout_rate`` must lie in ``[0, 1)``; ViT sizes must be integers ``>= 1`` with ``heads``
        dividing ``hidden``).
    """
    try:
        build = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {available()}") from None
    num_classes = check_int("num_classes", num_classes, low=1)
    return from_linen(build(num_classes=num_classes, dtype=dtype, **kwargs), name=name)
