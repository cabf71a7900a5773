"""What :mod:`jaxkd.models.lora` and :mod:`jaxkd.models.quantize` share on top of qwix (google/qwix): which
operand of an intercepted matmul is a parameter, and parameter paths.

qwix intercepts ``jnp.einsum`` / ``lax.dot_general`` inside a Linen module and finds the parameter an operand
came from (``qwix._src.utils.flax_util.find_param``: the same array, or one reached through unary ops such as
``astype``, or else a parameter of the same shape). A tied output projection reads ``embedding.T``: qwix would
take it for the embedding and replace or adapt the embedding with a transposed copy. Only an operand of the
parameter itself, or the parameter through casts, is taken here, so the transposed embedding stays a plain matmul.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from qwix._src.providers import ptq
from qwix._src.utils import flax_util

PyTree = Any


# What may stand between a parameter and the matmul operand taken for it: casts and sharding annotations,
# never a transpose or reshape (a tied output projection's embedding.T).
_CASTS = frozenset({"convert_element_type", "sharding_constraint", "copy", "copy_p"})


def weight_name(operand: Any) -> str | None:
    """The name of the current module's parameter ``operand`` is (possibly cast), or ``None``: not a parameter,
    or a transposed / reshaped view of one (qwix's own lookup would accept those)."""
    name = flax_util.find_param(operand, ptq.WithAux)
    if name is None:
        return None
    module = flax_util.get_current_module()
    if not isinstance(module, nn.Module):
        return None
    stored = flax_util.unbox(module.get_variable("params", name))
    if isinstance(stored, ptq.WithAux):  # already quantized: qwix hands the stored weight itself
        return name if isinstance(operand, ptq.WithAux) else None
    return name if _is_cast_of(operand, stored) else None


def _is_cast_of(x: Any, param: Any) -> bool:
    """``x`` is ``param``, or ``param`` through casts only: followed up the trace while tracing; compared by
    value when both are concrete (an eager ``init``)."""
    while x is not param:
        if isinstance(x, jax.core.Tracer):
            parent = getattr(x, "parent", None)  # the traced equation that made x
            if parent is None or parent.primitive.name not in _CASTS or len(parent.in_tracers) != 1:
                return False
            x = parent.in_tracers[0]
            continue
        if isinstance(param, jax.core.Tracer) or tuple(x.shape) != tuple(param.shape):
            return False
        return bool(jnp.array_equal(x, jnp.asarray(param).astype(x.dtype)))
    return True


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

