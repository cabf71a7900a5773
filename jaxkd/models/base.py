"""The one contract between jaxkd and a model: ``apply -> Outputs(logits, features, model_state)``.

Losses ask for intermediate features by name; models publish them with Flax ``sow`` into the
``"intermediates"`` collection (no hooks, no module paths). Any model — a Linen module, an NNX module
split into graphdef and state, a plain function — plugs in through a :class:`Model`: a pair of pure
functions ``init(rng, x) -> variables`` and ``apply(variables, x, *, train, rngs) -> Outputs``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

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
    """

    init: Callable[..., PyTree]
    apply: Callable[..., Outputs]
    name: str = "model"
    module: Any = None


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


def from_linen(module: nn.Module, *, name: str | None = None) -> Model:
    """Wraps a Linen module whose ``__call__(x, train)`` returns logits and sows features.

    Non-parameter collections (``batch_stats`` …) are mutable in train mode and returned as the new
    ``model_state``; features are read from the ``"intermediates"`` collection and flattened to
    ``"name"`` (or ``"submodule/name"`` for sows below the top module).
    """

    def init(rng: Array, x: Array) -> PyTree:
        variables = module.init({"params": rng, "dropout": rng}, x, train=False)
        return {k: v for k, v in variables.items() if k != INTERMEDIATES}

    def apply(variables: PyTree, x: Array, *, train: bool, rngs: Mapping[str, Array] | None = None) -> Outputs:
        state_cols = [k for k in variables if k != "params"]
        mutable = [INTERMEDIATES] + (state_cols if train else [])
        logits, updated = module.apply(
            variables, x, train=train, rngs=dict(rngs or {}), mutable=mutable
        )
        updated = dict(updated)
        features = _flatten_intermediates(updated.pop(INTERMEDIATES, {}))
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


def split_variables(variables: Mapping[str, PyTree]) -> tuple[PyTree, dict[str, PyTree]]:
    """``variables -> (params, model_state)`` where model_state holds every other collection."""
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables


def merge_variables(params: PyTree, model_state: Mapping[str, PyTree]) -> dict[str, PyTree]:
    return {"params": params, **model_state}
