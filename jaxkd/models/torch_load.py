"""Published PyTorch checkpoints into jaxkd's models: ``load_torch(name, state_dict_or_path, num_classes=...)``.

Distillation papers start from published teachers (RepDistiller's and mdistiller's ``ckpt_epoch_240.pth``).
:func:`load_torch` returns the variables (``{"params": ..., "batch_stats": ...}``) of
``jaxkd.models.get(name, num_classes=num_classes)`` filled from such a checkpoint, so that the jaxkd model
computes the official model's eval-mode logits::

    from jaxkd import models
    variables = models.load_torch("resnet32x4", "resnet32x4_vanilla/ckpt_epoch_240.pth", num_classes=100)
    teacher = models.get("resnet32x4", num_classes=100)
    logits = teacher.apply(variables, images, train=False).logits

The checkpoint is a mapping of arrays (torch tensors or NumPy arrays), a ``.pth``/``.pt`` file (read with
``torch.load(weights_only=True)``; torch is imported only then and is the optional ``torch`` extra) or a
``.safetensors`` file (``safetensors.numpy``, no torch). RepDistiller's / mdistiller's ``{"model": state_dict}``
wrapper and a ``{"state_dict": ...}`` wrapper are unwrapped, the ``module.`` prefix of a ``DataParallel``
model is stripped and BatchNorm's ``num_batches_tracked`` counters are ignored.

How an architecture plugs in: a *key map* ``fn(template_variables) -> {torch_key: (path_tuple, transform)}``
names, for every ``state_dict`` key, the leaf of the variables it fills (``("params", "conv1", "kernel")``,
``("batch_stats", "bn1", "mean")``) and the NumPy layout change (:func:`conv_kernel`, :func:`linear_kernel`,
:func:`identity`). Modules listed in :data:`_KEY_MAP_MODULES` each export a ``KEY_MAPS`` dict from registered
model name to key map (:mod:`jaxkd.models.torch_cifar` for the CIFAR models); :func:`module_entries` builds a
key map from a path translator.

Every mismatch between the checkpoint and the model is a ``ValueError`` that says what to fix: a missing or an
unexpected key (named, with the closest key of the other side), a shape mismatch (the key and both shapes),
a classifier for another number of classes (both counts), and a checkpoint of another architecture (how many
keys or shapes disagree, and the registered architectures whose keys and convolution shapes match it).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import os
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]
#: ``{torch_key: (path into the variables, transform of the NumPy array)}``.
KeyMap = dict[str, tuple[tuple[str, ...], Transform]]

#: Modules exporting ``KEY_MAPS: dict[str, fn(template_variables) -> KeyMap]``, merged in this order.
_KEY_MAP_MODULES = ("jaxkd.models.torch_cifar", "jaxkd.models.torch_imagenet")

# The template is traced (never computed) on images of this shape unless told otherwise; parameter shapes
# of the convolutional models depend only on its channels.
_TEMPLATE_INPUT = (1, 32, 32, 3)
# At most this many unmatched keys (missing + unexpected), or mismatched convolution shapes, are reported one
# by one; more means the checkpoint is of another architecture.
_FEW = 4


# ------------------------------------------------------------------------------------------- converters


def identity(a: np.ndarray) -> np.ndarray:
    """Same layout in both frameworks (biases, BatchNorm vectors)."""
    return a


def conv_kernel(a: np.ndarray) -> np.ndarray:
    """PyTorch ``[out, in / groups, kh, kw]`` -> Flax ``[kh, kw, in / groups, out]`` (grouped and depthwise too)."""
    return np.transpose(a, (2, 3, 1, 0))


def linear_kernel(a: np.ndarray) -> np.ndarray:
    """PyTorch ``nn.Linear`` ``[out, in]`` -> Flax ``Dense`` ``[in, out]`` (inputs already in the same order)."""
    return np.transpose(a)


# ------------------------------------------------------------------------------------------- key maps


def _param_modules(tree: Mapping[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict]]:
    """``(module path, {leaf name: leaf})`` for every module of ``tree`` that holds leaves."""
    leaves = {k: v for k, v in tree.items() if not isinstance(v, Mapping)}
    if leaves:
        yield path, leaves
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _param_modules(value, (*path, key))


def module_entries(template: Mapping[str, Any], translate: Callable[[tuple[str, ...]], str]) -> KeyMap:
    """The key map of a model whose layers are convolutions, BatchNorms and Dense layers.

    ``translate(module_path) -> torch_prefix`` names the official module of each jaxkd parameter module (its
    path in ``template["params"]``); the layer type, read off the leaves, gives the tensor names: a BatchNorm
    (``scale``) fills ``weight``, ``bias``, ``running_mean`` and ``running_var`` (the last two into
    ``batch_stats``); a 4-D ``kernel`` is a convolution's ``weight`` (:func:`conv_kernel`); a 2-D one a Linear's
    (:func:`linear_kernel`); a ``bias`` is ``bias``.
    """
    entries: KeyMap = {}
    for path, leaves in _param_modules(template["params"]):
        prefix = translate(path)
        if "scale" in leaves:
            entries[f"{prefix}.weight"] = (("params", *path, "scale"), identity)
            entries[f"{prefix}.bias"] = (("params", *path, "bias"), identity)
            entries[f"{prefix}.running_mean"] = (("batch_stats", *path, "mean"), identity)
            entries[f"{prefix}.running_var"] = (("batch_stats", *path, "var"), identity)
            continue
        kernel = leaves.get("kernel")
        if kernel is None or len(kernel.shape) not in (2, 4) or set(leaves) - {"kernel", "bias"}:
            raise ValueError(f"module_entries: no PyTorch layer for the parameters {sorted(leaves)} at {path}")
        entries[f"{prefix}.weight"] = (("params", *path, "kernel"), conv_kernel if len(kernel.shape) == 4 else linear_kernel)
        if "bias" in leaves:
            entries[f"{prefix}.bias"] = (("params", *path, "bias"), identity)
    return entries


@functools.cache
def key_maps() -> dict[str, Callable[[Mapping[str, Any]], KeyMap]]:
    """Every registered model name :func:`load_torch` reads -> its key map (from :data:`_KEY_MAP_MODULES`)."""
    merged: dict[str, Callable[[Mapping[str, Any]], KeyMap]] = {}
    for module in _KEY_MAP_MODULES:
        merged.update(importlib.import_module(module).KEY_MAPS)
    return merged


@functools.cache
def _template(name: str, num_classes: int, input_shape: tuple[int, ...] = _TEMPLATE_INPUT) -> Any:
    from jaxkd import models

    model = models.get(name, num_classes=num_classes)
    return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(input_shape, jnp.float32))


@functools.cache
def _conv_signature(name: str) -> tuple[frozenset[str], tuple[tuple[str, tuple[int, ...], Transform], ...]]:
    """``(torch keys, (key, shape, transform) of the 4-D convolution kernels)`` of ``name``: what identifies an
    architecture whatever its classifier."""
    template = _template(name, 10, _TEMPLATE_INPUT)  # the positional key a load_torch(num_classes=10) call caches
    entries = key_maps()[name](template)
    convs = tuple((k, tuple(_leaf(template, path).shape), fn) for k, (path, fn) in sorted(entries.items())
                  if len(_leaf(template, path).shape) == 4)
    return frozenset(entries), convs


def _matching_architectures(state: Mapping[str, np.ndarray]) -> list[str]:
    """The registered names whose keys equal the checkpoint's and whose convolution kernels have its shapes.

    Traces every architecture's template once per process (a few seconds in all, on the error path only);
    aliases (``ResNet50`` / ``cifar_resnet50``) are traced once.
    """
    from jaxkd import models

    by_builder: dict[int, list[str]] = {}
    for name in sorted(key_maps()):
        by_builder.setdefault(id(models._REGISTRY[name]), []).append(name)
    keys = frozenset(state)
    found = []
    for names in by_builder.values():
        expected_keys, convs = _conv_signature(names[0])
        if expected_keys == keys and all(state[k].ndim == 4 and fn(state[k]).shape == shape for k, shape, fn in convs):
            found.extend(names)
    return sorted(found)


def _leaf(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


# ------------------------------------------------------------------------------------------- reading


def _read(state_dict_or_path: Any) -> Mapping[str, Any]:
    if isinstance(state_dict_or_path, Mapping):
        return state_dict_or_path
    if not isinstance(state_dict_or_path, (str, os.PathLike)):
        raise ValueError(
            "load_torch reads a state dict (a mapping of torch tensors or NumPy arrays) or the path of a "
            f".pth/.pt/.safetensors file, got {type(state_dict_or_path).__name__}"
        )
    path = os.fspath(state_dict_or_path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".pth", ".pt", ".safetensors"):
        raise ValueError(f"load_torch reads .pth, .pt or .safetensors files, got {path!r}")
    if not os.path.exists(path):
        raise ValueError(f"load_torch: no such checkpoint file {path!r}")
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(path)
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading the PyTorch checkpoint {path!r} needs torch, which jaxkd does not install by default: "
            "pip install 'jaxkd[torch]' (or save the state dict as .safetensors, which needs no torch)"
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's unpickler refuses arbitrary objects
        raise ValueError(
            f"torch.load({path!r}, weights_only=True) failed ({type(exc).__name__}: {_first_line(exc)}); if the file "
            "is trusted, load it with torch.load(..., weights_only=False) yourself and pass its state dict"
        ) from exc


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""


def _to_numpy(key: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu()
        if not value.dtype.is_floating_point or value.dtype.itemsize < 4:
            value = value.float()  # bfloat16 / float16 have no NumPy view; integer buffers are compared as floats
        return value.numpy()
    if isinstance(value, np.ndarray) or hasattr(value, "__array__"):
        return np.asarray(value)
    raise ValueError(f"the checkpoint's entry {key!r} is a {type(value).__name__}, not an array")


def _state_dict(raw: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Unwraps ``{"model": ...}`` / ``{"state_dict": ...}``, strips ``module.`` and drops ``num_batches_tracked``."""
    for wrapper in ("model", "state_dict"):
        if isinstance(raw.get(wrapper), Mapping):
            raw = raw[wrapper]
            break
    state = {}
    for key, value in raw.items():
        key = str(key)
        if key.endswith("num_batches_tracked"):
            continue  # a BatchNorm step counter; eval-mode outputs never read it
        if key.startswith("module."):  # torch.nn.DataParallel / DistributedDataParallel
            key = key[len("module."):]
        state[key] = _to_numpy(key, value)
    if not state:
        raise ValueError("the checkpoint holds no tensors")
    return state


# ------------------------------------------------------------------------------------------- checks


def _closest(key: str, candidates) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.0)
    return repr(close[0]) if close else "none"


def _another_architecture(name: str, state: Mapping[str, np.ndarray], what: str) -> ValueError:
    matches = [m for m in _matching_architectures(state) if m != name]
    hint = (f"architectures whose keys and convolution shapes match it: {matches}" if matches
            else "no registered architecture has its keys and convolution shapes")
    return ValueError(f"the checkpoint is not a {name}: {what}; {hint}")


def _check_keys(name: str, state: Mapping[str, np.ndarray], entries: KeyMap) -> None:
    missing = sorted(set(entries) - set(state))
    extra = sorted(set(state) - set(entries))
    if not missing and not extra:
        return
    if len(missing) + len(extra) > _FEW:
        examples = [f"unexpected {k!r}" for k in extra[:1]] + [f"missing {k!r}" for k in missing[:1]]
        raise _another_architecture(
            name, state,
            f"{len(extra)} of its {len(state)} keys are not {name}'s and {len(missing)} of {name}'s "
            f"{len(entries)} keys are not in it (e.g. {', '.join(examples)})",
        )
    lines = [f"missing key {k!r} (closest key in the checkpoint: {_closest(k, state)})" for k in missing]
    lines += [f"unexpected key {k!r} (closest key of {name}: {_closest(k, entries)})" for k in extra]
    # A close architecture differs in a few keys only (wrn_16_2 has one shortcut more than wrn_16_1).
    matches = _matching_architectures(state)
    hint = f"; the checkpoint's keys and convolution shapes are those of {matches}" if matches else ""
    raise ValueError(f"the checkpoint does not fit {name}: " + "; ".join(lines) + hint)


def _is_classifier(leaf_shape: tuple[int, ...], array_shape: tuple[int, ...], num_classes: int) -> bool:
    """A Dense kernel/bias whose only difference from the checkpoint is its class dimension (the last)."""
    return (len(leaf_shape) in (1, 2) and len(array_shape) == len(leaf_shape) and leaf_shape[-1] == num_classes
            and leaf_shape[:-1] == array_shape[:-1])


def load_torch(
    name: str, state_dict_or_path: Any, *, num_classes: int, input_shape: tuple[int, ...] = _TEMPLATE_INPUT
) -> dict[str, Any]:
    """The variables of ``jaxkd.models.get(name, num_classes=num_classes)`` filled from a PyTorch checkpoint.

    Args:
      name: a registered model that has a key map (:func:`key_maps`: RepDistiller's CIFAR models under jaxkd's
        and RepDistiller's names, e.g. ``"resnet32x4"``, ``"wrn_40_2"``, ``"vgg13"``, ``"ResNet50"``,
        ``"MobileNetV2"``, ``"ShuffleV1"``, ``"ShuffleV2"``).
      state_dict_or_path: a mapping of torch tensors / NumPy arrays (possibly wrapped as
        ``{"model": state_dict}`` or ``{"state_dict": ...}``, keys possibly prefixed ``module.``), or the path
        of a ``.pth`` / ``.pt`` (needs torch: ``pip install 'jaxkd[torch]'``) or ``.safetensors`` file.
      num_classes: the classifier's outputs; must equal the checkpoint's.
      input_shape: ``[batch, height, width, channels]`` of the images the model will see; the variables are
        shaped by tracing ``model.init`` on it (nothing is computed), so only its channels matter for the
        convolutional models: they must be the checkpoint's (3 for the published CIFAR models).

    Returns:
      ``{"params": ..., "batch_stats": ...}`` of float32 ``jax.Array`` leaves, the structure
      ``model.init`` gives, so that ``model.apply(variables, x, train=False)`` computes the official model's
      eval-mode logits.

    Raises:
      ValueError: ``name`` has no key map; the checkpoint cannot be read or holds a non-array entry; it lacks a
        key or has an unexpected one (each named with the closest key of the other side); an array's shape
        differs from the model's (key and both shapes); its classifier has another number of classes (both
        named); it is of another architecture (counts of the keys or shapes that disagree, and the registered
        architectures that match it).
      ImportError: a ``.pth`` / ``.pt`` file without torch installed.
    """
    from jaxkd.checks import check_int

    from jaxkd import models

    maps = key_maps()
    if name not in maps:
        what = "has no PyTorch key map for" if name in models.available() else "unknown model"
        raise ValueError(f"load_torch {what} {name!r}; it reads: {sorted(maps)}")
    num_classes = check_int("num_classes", num_classes, low=1)
    input_shape = tuple(check_int(f"input_shape[{i}]", d, low=1) for i, d in enumerate(input_shape))
    template = _template(name, num_classes, input_shape)
    entries = maps[name](template)
    state = _state_dict(_read(state_dict_or_path))
    _check_keys(name, state, entries)

    converted, wrong, classifier = {}, [], None
    for key, (path, transform) in entries.items():
        shape = tuple(_leaf(template, path).shape)
        if state[key].ndim != len(shape):  # no layout to convert: a tensor of another rank
            wrong.append((key, state[key].shape, state[key].shape, path, shape))
            continue
        array = transform(state[key])
        if tuple(array.shape) != shape:
            if _is_classifier(shape, tuple(array.shape), num_classes):
                classifier = classifier or (key, array.shape[-1])
            else:
                wrong.append((key, state[key].shape, array.shape, path, shape))
        converted[key] = array
    if len(wrong) > _FEW:
        # A convolution's kernel is the telling example (the classifier's and BatchNorms' follow from them).
        key, raw_shape, _, _, shape = next((w for w in wrong if len(w[1]) == 4), wrong[0])
        raise _another_architecture(
            name, state, f"{len(wrong)} of its {len(entries)} arrays have other shapes than {name}'s (e.g. "
            f"{key!r}: {tuple(raw_shape)} in the checkpoint)",
        )
    if wrong:
        raise ValueError("the checkpoint's shapes do not fit " + name + ": " + "; ".join(
            f"{key!r} has shape {tuple(raw)} ({tuple(arr)} in jaxkd's layout), {name} expects {shape} at "
            f"{'/'.join(path)}" for key, raw, arr, path, shape in wrong))
    if classifier is not None:  # the architecture fits; only the class count differs
        key, classes = classifier
        raise ValueError(f"the checkpoint's classifier {key!r} has {classes} classes, but num_classes={num_classes} "
                         f"was asked; pass num_classes={classes}")

    filled = {path: jnp.asarray(converted[key], dtype=_leaf(template, path).dtype)
              for key, (path, _) in entries.items()}
    unfilled = ["/".join(p) for p in _leaf_paths(template) if p not in filled]
    if unfilled:  # a key map that misses a variable: a bug of the map, not of the checkpoint
        raise AssertionError(f"the key map of {name} fills no value for {unfilled}")
    return _nest(filled)


def _leaf_paths(tree: Mapping[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaf_paths(value, (*path, key))
        else:
            yield (*path, key)


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    """``{("params", "fc", "kernel"): a} -> {"params": {"fc": {"kernel": a}}}``."""
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        node = nested
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return nested
