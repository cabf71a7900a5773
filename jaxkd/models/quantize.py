"""int8 weight-only quantization of a frozen model, through qwix's post-training quantization (google/qwix
``PtqProvider``, ``quantize_params``).

Every weight used in a matmul (``jnp.einsum`` / ``lax.dot_general``; for :class:`~jaxkd.models.lm.TransformerLM`
the attention and MLP projections and an untied head) is stored as int8 with one float32 scale per output
channel: symmetric absmax over the contracted axes, ``s = max |W| / 127.5`` (qwix's bound: the top bucket spans
``[126.5, 127.5]``), ``q = round(W / s)`` in int8, and the matmul runs on ``q · s`` (qwix's ``QArray``;
activations stay in the compute dtype). The embedding table and norm
scales are not matmul weights and stay as they are; so does a tied output projection (``embedding.T``). Weight-only
int8 of this kind is LLM.int8()'s vector-wise quantization without the outlier split (Dettmers et al.,
"LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale", 2022).

The quantized parameters are qwix ``WithAux(QArray(qvalue int8, scale float32))`` leaves, about a quarter of the
float32 bytes (half of bfloat16's). The model is for a frozen participant (a teacher): it is not trainable.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import qwix
from qwix._src.providers import ptq

from jaxkd.models import _qwix
from jaxkd.models.base import Model, from_linen

PyTree = Any

__all__ = ["quantize_int8"]


class _Int8Weights(qwix.PtqProvider):
    """qwix PTQ, int8 weights only, per output channel; only operands that are a parameter in its own
    shape are quantized (not a tied ``embedding.T``: :mod:`jaxkd.models._qwix`)."""

    def __init__(self):
        super().__init__([qwix.QuantizationRule(module_path=".*", weight_qtype=jnp.int8)])

    def einsum(self, einsum_str, *operands, **kwargs):
        if len(operands) == 2 and not isinstance(operands[1], ptq.WithAux) and _qwix.weight_name(operands[1]) is None:
            return jnp.einsum(einsum_str, *operands, **kwargs)
        return super().einsum(einsum_str, *operands, **kwargs)

    def dot_general(self, lhs, rhs, dimension_numbers, *args, **kwargs):
        if not isinstance(rhs, ptq.WithAux) and _qwix.weight_name(rhs) is None:
            return jax.lax.dot_general(lhs, rhs, dimension_numbers, *args, **kwargs)
        return super().dot_general(lhs, rhs, dimension_numbers, *args, **kwargs)

    def nn_param(self, module, name, *args, **kwargs):
        # The stored int8 weight, castable to the compute dtype (w.astype(dtype) in the model).
        return _qwix.castable(super().nn_param(module, name, *args, **kwargs))


def quantize_int8(model: Model, variables: Mapping[str, PyTree], x: Any, *,
                  name: str | None = None) -> tuple[Model, dict[str, PyTree]]:
    """``(int8 model, its variables)``: ``model`` with its matmul weights int8 per output channel, for a frozen
    participant (``jaxkd.teacher(*quantize_int8(model, variables, x))``). ``x`` is an example input (its
    shapes tell qwix which weights are matmul operands and along which axes they contract).

    Raises:
      ValueError: ``model`` wraps no Linen module, ``variables`` are not its variables, or no weight was
        quantized (the model multiplies by no parameter through einsum / dot_general).
    """
    if not isinstance(model, Model) or model.module is None:
        raise ValueError(f"quantize_int8 takes a jaxkd Model wrapping a Linen module (model.module), got {model!r}")
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError(f"variables must be a variables dict with 'params', got {type(variables).__name__}")
    module = qwix.quantize_model(model.module, _Int8Weights())
    quantized = from_linen(module, name=name or f"{model.name}_int8")
    abstract = jax.eval_shape(quantized.init, jax.random.key(0), x)["params"]
    params = jax.tree.map(jnp.asarray, flax.core.meta.unbox(dict(variables["params"])))
    try:
        qparams = qwix.quantize_params(params, abstract)
    except (ValueError, TypeError) as err:
        raise ValueError(f"variables do not match {model.name}: {err}") from None
    if not any(isinstance(leaf, ptq.WithAux) for leaf in
               jax.tree.leaves(qparams, is_leaf=lambda v: isinstance(v, ptq.WithAux))):
        raise ValueError(f"quantize_int8 found no matmul weight in {model.name}; its parameters are "
                         f"{_qwix.param_paths(params)}")
    return quantized, {**variables, "params": qparams}
