"""Low-rank adapters (LoRA) on a Linen model's projections, through qwix (google/qwix ``LoraProvider``).

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021) keeps a pretrained weight ``W``
frozen and learns a low-rank update: a matmul ``x W`` becomes ``x W + (alpha / rank) · (x A) B`` with
``A [in, rank]`` and ``B [rank, out]`` (for a multi-axis weight, ``A`` spans its contracted axes and ``B`` the
others, e.g. a query ``[d, H, hd]`` gets ``A [d, r]``, ``B [r, H, hd]``). ``A`` starts He-uniform and ``B`` at
zero, so the adapted model starts as the base model exactly.

qwix intercepts ``jnp.einsum`` / ``lax.dot_general`` in the module and adds the adapter parameters next to the
weight: ``<name>_lora_a`` and ``<name>_lora_b`` (``block_0/attention/query_lora_a``), carrying the weight's
logical axis names (so they shard with it). qwix selects modules by path; ``targets`` here selects
*parameters* (``".*attention/(query|value)"``: the query and value projections of every block), checked
against each weight as it is used.

Training only the adapters: ``jaxkd.Participant(lora_model, init_lora(...), trainable=ADAPTERS)``.
Export: :func:`merge_lora` folds ``(alpha / rank) A B`` into ``W`` and gives the base model back.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from qwix._src.core import einsum_info
from qwix._src.providers import lora as qwix_lora
from qwix._src.providers import ptq

from jaxkd.checks import check_int, check_number
from jaxkd.models import _qwix
from jaxkd.models.base import Model, from_linen

PyTree = Any

__all__ = ["ADAPTERS", "LoraModel", "init_lora", "lora", "merge_lora"]

#: The adapter parameters' paths (``Participant(trainable=ADAPTERS)`` trains only them).
ADAPTERS = r".*_lora_[ab]"
_SUFFIX_A, _SUFFIX_B = "_lora_a", "_lora_b"


@dataclasses.dataclass(frozen=True, eq=False)
class LoraModel(Model):
    """A :class:`~jaxkd.models.Model` with adapters (from :func:`lora`); ``base`` is the model it adapts."""

    base: Model | None = None
    targets: str = ""
    rank: int = 0
    alpha: float = 0.0


class _TargetedLora(qwix.LoraProvider):
    """qwix's LoRA on the weights whose path matches ``targets`` (qwix itself matches module paths only).

    Only layouts :func:`merge_lora` can fold are accepted: the weight's contracted axes first, then its
    output axes, no batch axes (every projection of :class:`~jaxkd.models.lm.TransformerLM`, a Dense kernel).
    """

    def __init__(self, targets: str, rank: int, alpha: float):
        super().__init__(module_path=".*", rank=rank, alpha=alpha)
        self._targets = re.compile(targets)

    def _target(self, rhs) -> str | None:
        name = _qwix.weight_name(rhs)
        return name if name is not None and self._targets.fullmatch(_qwix.weight_path(name)) else None

    def einsum(self, einsum_str, *operands, **kwargs):
        name = self._target(operands[1]) if len(operands) == 2 else None
        # The frozen matmul as qwix's PTQ parent computes it (counting the op as qwix's LoRA does).
        out = ptq.PtqProvider.einsum(self, einsum_str, *operands, **kwargs)
        if name is None:
            return out
        lhs, rhs = operands
        info = einsum_info.EinsumInfo.parse(einsum_str, ndims=(lhs.ndim, rhs.ndim))
        contracted = [c in info.lhs for c in info.rhs]
        if any(c in info.lhs and c in info.out for c in info.rhs) or contracted != sorted(contracted, reverse=True):
            raise ValueError(
                f"LoRA on {_qwix.weight_path(name)!r} ({einsum_str!r}): only weights whose contracted axes come "
                "first and that have no batch axes are supported (merge_lora folds A·B into them)")
        rule, _ = self._get_current_rule_and_op_id("einsum", repeated_call=True)
        a_shape, b_shape, lora_str, a_axes, b_axes = qwix_lora._parse_einsum_str_for_lora(
            lhs.shape, rhs.shape, einsum_str, rule.rank)
        # qwix's own LoraProvider.einsum also stores the einsum string on the module, which a compact Linen
        # module refuses (frozen); the rest is the same: its parameter creation, then x A B · alpha / rank.
        lora_a, lora_b = qwix_lora._get_or_create_lora_params(
            name=name, rule=rule, a_shape=a_shape, b_shape=b_shape, a_sharding_transpose=a_axes,
            b_sharding_transpose=b_axes)
        return out + jnp.einsum(lora_str, lhs, lora_a, lora_b, **kwargs) * (rule.alpha / rule.rank)

    def dot_general(self, lhs, rhs, dimension_numbers, *args, **kwargs):
        name = self._target(rhs)
        if name is None:
            return ptq.PtqProvider.dot_general(self, lhs, rhs, dimension_numbers, *args, **kwargs)
        (_, rhs_contract), (_, rhs_batch) = dimension_numbers
        if tuple(rhs_batch) or tuple(rhs_contract) != tuple(range(len(rhs_contract))):
            raise ValueError(
                f"LoRA on {_qwix.weight_path(name)!r}: only weights whose contracted axes come first and that have "
                f"no batch axes are supported, got dimension numbers {dimension_numbers}")
        return super().dot_general(lhs, rhs, dimension_numbers, *args, **kwargs)


def lora(model: Model, *, targets: str, rank: int, alpha: float, name: str | None = None) -> LoraModel:
    """``model`` with LoRA adapters on the weights whose path fully matches the regex ``targets``.

    Each matched matmul ``x W`` computes ``x W + (alpha / rank) · x A B`` (Hu et al., 2021; qwix's
    ``LoraProvider``). The adapters ``<weight>_lora_a`` / ``<weight>_lora_b`` are parameters of the returned
    model: its ``init`` creates them (``B = 0``), so start from :func:`init_lora` to keep pretrained weights.

    Args:
      model: a model wrapping a Linen module (``model.module``, e.g. :func:`jaxkd.models.lm.lm`); features
        captured with ``from_linen(capture=...)`` are not carried over.
      targets: regex over parameter paths such as ``"block_0/attention/query"`` (``re.fullmatch``), e.g.
        ``".*attention/(query|value)"``.
      rank: the adapters' rank ``r >= 1``.
      alpha: the scale numerator (the update is ``alpha / rank · A B``), > 0.

    Raises:
      ValueError: a model without a Linen module, a bad ``targets`` regex, rank or alpha; at ``init`` (and so
        at :func:`init_lora` and :func:`jaxkd.create`), ``targets`` matching no adaptable weight (the message
        lists the parameter paths).
    """
    if not isinstance(model, Model) or model.module is None:
        raise ValueError(f"lora adapts a jaxkd Model wrapping a Linen module (model.module), got {model!r}")
    if isinstance(model, LoraModel):
        raise ValueError(f"model {model.name!r} already has LoRA adapters (targets {model.targets!r})")
    if not isinstance(targets, str) or not targets:
        raise ValueError(f"targets must be a regex over parameter paths such as '.*attention/query', got {targets!r}")
    try:
        re.compile(targets)
    except re.error as err:
        raise ValueError(f"targets {targets!r} is not a valid regex: {err}") from None
    rank = check_int("rank", rank, low=1)
    check_number("alpha", alpha, low=0.0, low_open=True)
    alpha = float(alpha)
    module = qwix.apply_lora_to_model(model.module, _TargetedLora(targets, rank, alpha))
    adapted = from_linen(module, name=name or f"{model.name}_lora{rank}")

    def init(rng, x):
        variables = adapted.init(rng, x)
        paths = _qwix.param_paths(variables["params"])
        if not any(p.endswith(_SUFFIX_A) for p in paths):
            raise ValueError(
                f"LoRA targets {targets!r} match no weight of {model.name} used in a matmul; its parameter paths "
                f"are: {paths}")
        return variables

    return LoraModel(init=init, apply=adapted.apply, name=adapted.name, module=module, base=model, targets=targets,
                     rank=rank, alpha=alpha)


def init_lora(model: LoraModel, base_variables: Mapping[str, PyTree], rng: jax.Array, x: Any) -> dict[str, PyTree]:
    """``model``'s variables with the pretrained ``base_variables`` and fresh adapters (``A`` He-uniform,
    ``B = 0``: the adapted model's outputs equal the base model's). ``x`` is an example input (shapes only).

    Raises:
      ValueError: ``model`` is not a :class:`LoraModel`, or ``base_variables`` are not its base model's
        (a missing, unexpected or differently shaped parameter is named).
    """
    if not isinstance(model, LoraModel):
        raise ValueError(f"init_lora takes a model from jaxkd.models.lora.lora, got {type(model).__name__}")
    if not isinstance(base_variables, Mapping) or "params" not in base_variables:
        raise ValueError(f"base_variables must be a variables dict with 'params', got {type(base_variables).__name__}")
    fresh = flax.core.meta.unbox(jax.jit(model.init)(rng, x))
    flat = flax.traverse_util.flatten_dict(dict(fresh["params"]))
    base = flax.traverse_util.flatten_dict(flax.core.meta.unbox(dict(base_variables["params"])))
    expected = {k for k in flat if not k[-1].endswith((_SUFFIX_A, _SUFFIX_B))}
    for key in sorted(set(base) ^ expected):
        which = "missing" if key in expected else "unexpected"
        raise ValueError(f"base_variables do not match {model.base.name}: {which} parameter {'/'.join(key)!r}")
    for key, value in base.items():
        if np.shape(value) != np.shape(flat[key]):
            raise ValueError(f"base_variables do not match {model.base.name} at {'/'.join(key)!r}: shape "
                             f"{np.shape(value)}, the model has {np.shape(flat[key])}")
        flat[key] = value
    return {**fresh, **{k: v for k, v in base_variables.items() if k != "params"},
            "params": flax.traverse_util.unflatten_dict(flat)}


def merge_lora(model: LoraModel, variables: Mapping[str, PyTree]) -> tuple[Model, dict[str, PyTree]]:
    """``(base model, variables)`` with every adapter folded in: ``W <- W + (alpha / rank) · A B`` (``A``'s
    leading axes are ``W``'s contracted ones, ``B``'s trailing axes its output ones; computed in float32 and
    cast to ``W``'s dtype), the ``*_lora_a`` / ``*_lora_b`` parameters dropped. The merged model computes what
    the adapted one does (up to rounding) and exports like any base model (:func:`jaxkd.models.to_hf`).

    Raises:
      ValueError: ``model`` is not a :class:`LoraModel`; an adapter without its pair or whose shapes do not
        factor its weight.
    """
    if not isinstance(model, LoraModel):
        raise ValueError(f"merge_lora takes a model from jaxkd.models.lora.lora, got {type(model).__name__}")
    flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(dict(variables["params"])))
    scale = model.alpha / model.rank
    merged = {}
    for key, w in flat.items():
        if key[-1].endswith((_SUFFIX_A, _SUFFIX_B)):
            continue
        a_key, b_key = (*key[:-1], key[-1] + _SUFFIX_A), (*key[:-1], key[-1] + _SUFFIX_B)
        if (a_key in flat) != (b_key in flat):
            raise ValueError(f"{'/'.join(key)!r} has only one of its adapters {_SUFFIX_A}, {_SUFFIX_B}")
        if a_key in flat:
            a, b = flat[a_key], flat[b_key]
            k = a.ndim - 1
            if (a.shape[-1], b.shape[0]) != (model.rank, model.rank) or (w.shape[:k], w.shape[k:]) != (
                    a.shape[:-1], b.shape[1:]):
                raise ValueError(f"the adapters of {'/'.join(key)!r} {a.shape}, {b.shape} do not factor its "
                                 f"weight {w.shape} at rank {model.rank}")
            delta = jnp.reshape(a, (-1, model.rank)).astype(jnp.float32) @ jnp.reshape(b, (model.rank, -1)).astype(
                jnp.float32)
            w = (w.astype(jnp.float32) + scale * delta.reshape(w.shape)).astype(w.dtype)
        merged[key] = w
    return model.base, {**variables, "params": flax.traverse_util.unflatten_dict(merged)}
