"""What :mod:`jaxkd.models.lora` and :mod:`jaxkd.models.quantize` share on top of qwix (google/qwix): which
operand of an intercepted matmul is a parameter, and parameter paths.

qwix intercepts ``jnp.einsum`` / ``lax.dot_general`` inside a Linen module and finds the parameter an operand
came from (``qwix._src.utils.flax_util.find_param``: the same array, or one reached through unary ops such as
``astype``, or else a parameter of the same shape). A tied output projection reads ``embedding.T``: qwix would
take it for the embedding and replace or adapt the embedding with a transposed copy. Only an operand of the
parameter's own shape is taken here, so the transposed embedding stays a plain matmul.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
from qwix._src.providers import ptq
from qwix._src.utils import flax_util

PyTree = Any


def weight_name(operand: Any) -> str | None:
    """The name of the current module's parameter ``operand`` is (possibly cast), or ``None``: not a parameter,
    or a reshaped / transposed view of one."""
    name = flax_util.find_param(operand, ptq.WithAux)
    if name is None:
        return None
    module = flax_util.get_current_module()
    stored = flax_util.unbox(module.get_variable("params", name)) if isinstance(module, nn.Module) else None
    if stored is None or tuple(stored.shape) != tuple(operand.shape):
        return None
    return name


def weight_path(name: str) -> str:
    """``"block_0/attention/query"``: the current module's path and the parameter name."""
    return "/".join([*map(str, flax_util.get_current_module_path()), name])


def param_paths(params: PyTree) -> list[str]:
    """Every parameter's path ``"block_0/attention/query"`` (a quantized one's sub-arrays not spelt out)."""
    flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(dict(params)), is_leaf=lambda _, v: not isinstance(
        v, (dict, flax.core.FrozenDict)))
    return ["/".join(map(str, key)) for key in flat]


@flax.struct.dataclass
class CastableWeight(ptq.WithAux):
    """qwix's quantized weight (``WithAux``) whose ``astype`` casts the dequantized dtype (the scale), as
    ``w.astype(compute_dtype)`` in a model expects; qwix 0.1.8's own ``astype`` fails on a ``QArray``."""

    def astype(self, dtype):
        return self.replace(array=self.array.astype(dtype))


def castable(param: Any) -> Any:
    """``param`` (unboxed) with a quantized weight made :class:`CastableWeight`."""
    if isinstance(param, ptq.WithAux) and not isinstance(param, CastableWeight):
        return CastableWeight(param.array, param.how)
    return param

