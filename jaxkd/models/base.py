"""The one contract between jaxkd and a model: ``apply -> Outputs(logits, features, model_state)``.

Losses ask for intermediate features by name; models publish them with Flax ``sow`` into the
``"intermediates"`` collection (no hooks, no module paths). Any model — a Linen module, an NNX module
split into graphdef and state, a plain function — plugs in through a :class:`Model`: a pair of pure
functions ``init(rng, x) -> variables`` and ``apply(variables, x, *, train, rngs) -> Outputs``.

Distilling a Linen model that sows nothing: ``from_linen(module, capture=...)`` records layer outputs
with Flax's ``capture_intermediates`` and adds them to ``Outputs.features`` under the module's path,
without editing the model::

    model = from_linen(net, capture=("layer1", "layer2/block0"))   # those submodules' __call__ outputs
    model = from_linen(net, capture=True)                          # every submodule's __call__ output
    model = from_linen(net, capture=lambda mdl, method: method == "__call__" and "conv" in mdl.name)

A module at path ``("layer2", "block0")`` gives the feature ``"layer2/block0"`` for its ``__call__``
output and ``"layer2/block0/<method>"`` for another method's (a callable filter may select any method;
a path string ``"layer2/block0/encode"`` selects the ``encode`` method's output). The top module's own
``__call__`` output is :attr:`Outputs.logits` and is never a feature; ``setup`` is never captured. A
module called several times in one forward pass (a shared layer) gives its last output, as a sown
tuple does. Captured features sit next to the sown ones; a captured name that equals a sown name raises
``ValueError`` naming both. A requested path that no module has raises ``ValueError`` at the first apply
(at :func:`jaxkd.create`, which traces the models), listing the module paths the model does have: the
check runs as the forward pass is traced, so a module called only in train mode must be requested
of a model that is applied in train mode. Everything happens at trace time: it works under ``jit``, in
train and eval mode, and gradients flow through captured features as through any activation. With
``capture=None`` (the default) ``apply`` is exactly the plain ``module.apply``; unused captured features
are dropped by XLA's dead-code elimination under ``jit``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence, Union

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any

INTERMEDIATES = "intermediates"


@flax.struct.dataclass
class Outputs:
    """What a forward pass returns.

    Attributes:
      logits: ``[batch, ..., num_classes]`` class (or vocabulary) scores.
      features: flat mapping ``name -> array`` of the intermediate tensors the model sows.
      model_state: the updated non-parameter collections (e.g. ``{"batch_stats": ...}``); in eval mode
        these are the unchanged input collections.
    """

    logits: Array
    features: Mapping[str, Array]
    model_state: Mapping[str, PyTree]


def get_feature(outputs: Outputs, name: str, *, who: str = "model") -> Array:
    """Returns ``outputs.features[name]``; a clear error lists what the model does sow."""
    try:
        return outputs.features[name]
    except KeyError:
        raise ValueError(
            f"the {who} does not sow a feature named {name!r}; it sows: "
            f"{sorted(outputs.features)}"
        ) from None


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A model as two pure functions (the adapter every architecture goes through).

    Attributes:
      init: ``init(rng, x) -> variables`` where ``variables = {"params": ..., <other collections>}``.
      apply: ``apply(variables, x, *, train, rngs=None) -> Outputs``.
      name: a label for logs and error messages.
      module: the underlying Linen module when there is one (for inspection only).
      vocab_size: for a model whose logits were cut to a tokenizer's real vocabulary
        (:func:`jaxkd.models.vocab.truncate_vocab`), that size; ``None`` otherwise.
    """

    init: Callable[..., PyTree]
    apply: Callable[..., Outputs]
    name: str = "model"
    module: Any = None
    vocab_size: int | None = None


def _flatten_intermediates(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Array]:
    """``{"a": (x,), "sub": {"b": (y,)}} -> {"a": x, "sub/b": y}``; a sown tuple keeps its last value."""
    flat: dict[str, Array] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, tuple):
            flat[name] = value[-1]
        elif isinstance(value, Mapping):
            flat.update(_flatten_intermediates(value, prefix=f"{name}/"))
        else:
            flat[name] = value
    return flat


Capture = Union[bool, str, Sequence[str], Callable[[nn.Module, str], bool], None]


def _capture_filter(capture: Capture) -> tuple[Callable[[nn.Module, str], bool] | None, tuple[str, ...]]:
    """``capture`` as ``(filter(module, method) -> bool, requested paths)``; ``(None, ())`` for none."""
    if capture is None or capture is False:
        return None, ()
    if capture is True:
        return (lambda mdl, method: method == "__call__"), ()
    if callable(capture):
        return capture, ()
    paths = (capture,) if isinstance(capture, str) else capture
    if not isinstance(paths, Sequence) or not paths or not all(isinstance(p, str) and p.strip("/") for p in paths):
        raise ValueError(
            "capture= is True, a callable (module, method_name) -> bool, or a non-empty sequence of module "
            f"paths such as ('layer1', 'layer2/block0'); got {capture!r}"
        )
    wanted = frozenset(p.strip("/") for p in paths)

    def by_path(mdl: nn.Module, method: str) -> bool:
        return _capture_name(mdl.path, method) in wanted

    return by_path, tuple(dict.fromkeys(p.strip("/") for p in paths))


def _capture_name(path: tuple[str, ...], method: str) -> str:
    """``("layer2", "block0"), "__call__" -> "layer2/block0"``; another method -> ``"layer2/block0/method"``."""
    parts = list(path) if method == "__call__" else [*path, method]
    return "/".join(str(p) for p in parts)


def _split_captured(
    tree: Mapping[str, Any], captured: Mapping[tuple[tuple[str, ...], str], int]
) -> tuple[dict[str, Any], dict[str, Array]]:
    """Splits the ``"intermediates"`` tree into ``(sown tree, captured features by name)``.

    ``captured`` counts how often each ``(module path, method)`` output was captured (at least once per
    call; a lifted transform may trace a call more than once); Flax stores it in the same collection as
    ``sow`` does, at ``tree[*path][method]``. A tuple longer than the count there means the module also
    sowed a value under the method's name.
    """

    def copy(node):
        return {k: copy(v) for k, v in node.items()} if isinstance(node, Mapping) else node

    sown = copy(tree)
    features: dict[str, Array] = {}
    for (path, method), count in captured.items():
        node = sown
        for key in path:
            node = node[key]
        values = node.pop(method)
        name = _capture_name(path, method)
        if not isinstance(values, tuple) or len(values) > count:
            raise ValueError(
                f"the captured output of module {'/'.join(path) or '<top>'!r} method {method!r} (feature "
                f"{name!r}) clashes with a value the module sows under the name {method!r} (sown feature "
                f"{name if method != '__call__' else '/'.join([*path, method])!r}); rename the sow or "
                "capture another module"
            )
        features[name] = values[-1]
    return sown, features


def from_linen(module: nn.Module, *, name: str | None = None, capture: Capture = None) -> Model:
    """Wraps a Linen module whose ``__call__(x, train)`` returns logits and sows features.

    Non-parameter collections (``batch_stats`` …) are mutable in train mode and returned as the new
    ``model_state``; features are read from the ``"intermediates"`` collection and flattened to
    ``"name"`` (or ``"submodule/name"`` for sows below the top module).

    Args:
      module: the Linen module.
      name: a label (default: the module's class name).
      capture: also publish layer outputs the module does not sow (Flax ``capture_intermediates``):
        ``True`` for every submodule's ``__call__`` output; a sequence of module paths
        (``("layer1", "layer2/block0")``; ``"path/method"`` for another method's output); or a callable
        ``(module, method_name) -> bool`` as Flax takes it (``module.path`` is the module's path tuple).
        Captured outputs are features named by the module path (``"layer2/block0"``, or
        ``"layer2/block0/method"`` for a method other than ``__call__``). ``None``: nothing captured.

    Raises:
      ValueError: ``capture`` is malformed (here); at apply time, a requested path matches no module
        (the message lists the module paths the model has), or a captured name equals a sown name.
    """
    user_filter, requested = _capture_filter(capture)

    def init(rng: Array, x: Array) -> PyTree:
        variables = module.init({"params": rng, "dropout": rng}, x, train=False)
        return {k: v for k, v in variables.items() if k != INTERMEDIATES}

    def apply(variables: PyTree, x: Array, *, train: bool, rngs: Mapping[str, Array] | None = None) -> Outputs:
        state_cols = [k for k in variables if k != "params"]
        mutable = [INTERMEDIATES] + (state_cols if train else [])
        extra: dict[str, Any] = {}
        # (path, method) -> times captured, and every (path, method) called; filled while tracing.
        captured: dict[tuple[tuple[str, ...], str], int] = {}
        seen: dict[tuple[tuple[str, ...], str], None] = {}
        if user_filter is not None:
            def capture_filter(mdl: nn.Module, method: str) -> bool:
                path = tuple(mdl.path)
                if method == "setup" or (not path and method == "__call__"):
                    return False  # setup returns nothing; the top module's __call__ output is the logits
                seen[(path, method)] = None
                if not user_filter(mdl, method):
                    return False
                captured[(path, method)] = captured.get((path, method), 0) + 1
                return True

            extra["capture_intermediates"] = capture_filter
        logits, updated = module.apply(
            variables, x, train=train, rngs=dict(rngs or {}), mutable=mutable, **extra
        )
        updated = dict(updated)
        intermediates = updated.pop(INTERMEDIATES, {})
        captured_features: dict[str, Array] = {}
        if user_filter is not None:
            missing = [p for p in requested if p not in {_capture_name(*key) for key in captured}]
            if missing:
                available = sorted({_capture_name(*key) for key in seen})
                raise ValueError(
                    f"capture= names module path(s) {missing} that {type(module).__name__} does not call "
                    f"(train={train}); its module paths are: {available}"
                )
            intermediates, captured_features = _split_captured(intermediates, captured)
        features = _flatten_intermediates(intermediates)
        for feature, value in captured_features.items():
            if feature in features:
                raise ValueError(
                    f"the captured output {feature!r} (capture=) has the same name as the sown feature "
                    f"{feature!r}; capture another module or rename the sow"
                )
            features[feature] = value
        if train:
            model_state = {k: updated[k] for k in state_cols}
        else:
            model_state = {k: variables[k] for k in state_cols}
        return Outputs(logits=logits, features=features, model_state=model_state)

    return Model(init=init, apply=apply, name=name or type(module).__name__, module=module)


def check_image_input(module: nn.Module, x: Array, *, first_layer: str, flatten: bool = False) -> None:
    """Refuses an input ``x`` that ``module`` would silently mistrain on or fail on obscurely.

    Checks, with a ``ValueError`` naming the module, the expectation and the input's dtype and shape:

    * ``x`` has a floating dtype: uint8 images ``0..255`` must be normalized first (with
      :func:`jaxkd.data.normalize` or a :class:`jaxkd.data.Loader`), and raw pixels would train;
    * ``x`` is ``[batch, height, width, channels]`` (``flatten=False``, conv nets) or at least
      ``[batch, ...]`` (``flatten=True``, models that flatten each example);
    * at apply time only (while initializing, the parameters are being made to fit ``x``): ``x``
      fits the kernel of the module's first layer ``first_layer`` (a conv kernel's in-channels, or
      a Dense kernel's inputs for the flattened example), so a mismatch names the input instead of
      a kernel shape deep inside the network.

    Only shapes and dtypes are read, so this works on traced inputs inside ``jit``.
    """
    model = type(module).__name__
    shape = tuple(np.shape(x))
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{model} expects floating-point images normalized with jaxkd.data.normalize / the "
            f"Loader, got {dtype} input of shape {shape}"
        )
    if flatten:
        if len(shape) < 2:
            raise ValueError(f"{model} expects an input of shape [batch, ...], got input of shape {shape}")
    elif len(shape) != 4:
        raise ValueError(
            f"{model} expects images of shape [batch, height, width, channels], got input of shape "
            f"{shape} (rank {len(shape)})"
        )
    if module.is_initializing():
        return
    kernel = module.variables.get("params", {}).get(first_layer, {}).get("kernel")
    if kernel is None:
        return  # no parameters to compare with; Flax reports what is missing
    if flatten:
        expected, got = kernel.shape[0], int(np.prod(shape[1:]))
        if got != expected:
            raise ValueError(
                f"{model}: the model was initialized for inputs of {expected} values per example "
                f"(the flattened input size), got {got} values per example (input shape {shape})"
            )
    else:
        expected, got = kernel.shape[-2], shape[-1]
        if got != expected:
            raise ValueError(
                f"{model}: the model was initialized for {expected}-channel images, got {got} "
                f"channels (input shape {shape})"
            )


def classifier_logits(module: nn.Module, pooled: Array, num_classes: int, *, name: str = "fc", **dense) -> Array:
    """The image models' head: sows ``pooled`` (the ``[B, C]`` embedding fed to the classifier, published
    as ``"pooled"``) and returns ``Dense(num_classes)(pooled)`` as float32 logits ``[B, num_classes]``.

    Called inside ``module``'s compact ``__call__``: the Dense layer (``dtype=module.dtype``, further
    keyword arguments ``dense`` such as ``kernel_init``) is ``module``'s child named ``name``.
    """
    module.sow(INTERMEDIATES, "pooled", pooled)
    logits = nn.Dense(num_classes, dtype=module.dtype, name=name, **dense)(pooled)
    return logits.astype(jnp.float32)


def split_variables(variables: Mapping[str, PyTree]) -> tuple[PyTree, dict[str, PyTree]]:
    """``variables -> (params, model_state)`` where model_state holds every other collection."""
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables


def merge_variables(params: PyTree, model_state: Mapping[str, PyTree]) -> dict[str, PyTree]:
    return {"params": params, **model_state}
