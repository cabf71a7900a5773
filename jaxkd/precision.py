"""Mixed-precision policies for trained participants (students, peers, online teachers).

A :class:`Policy` names three dtypes, as DeepMind's jmp does (https://github.com/google-deepmind/jmp):
``param_dtype`` (the master parameters, hence their gradients and the optimizer state, which optax keeps
in the parameters' dtype), ``compute_dtype`` (activations and matmuls) and ``output_dtype`` (the logits,
hence every loss). Two are named:

* ``"float32"``: everything float32;
* ``"bfloat16"``: float32 master parameters and optimizer state, bfloat16 compute, float32 logits and
  losses — the recipe of Micikevicius et al., "Mixed Precision Training" (ICLR 2018), without loss scaling:
  bfloat16 has float32's 8-bit exponent, so small gradients do not underflow (Kalamkar et al., "A Study of
  BFLOAT16 for Deep Learning Training", 2019). Normalization statistics stay float32: flax's
  ``nn.BatchNorm`` / ``nn.LayerNorm`` with ``dtype=bfloat16`` compute mean and variance in float32
  (``force_float32_reductions``), keep their running averages in float32, normalize in float32 (the bf16
  input minus the float32 mean promotes) and only round the result to bfloat16; the LM's RMSNorm, softmax
  and RoPE run in float32 (:mod:`jaxkd.models.lm`).

``"float16"`` is refused: its 5-bit exponent flushes gradients below ~6e-8 to zero, which needs dynamic
loss scaling, and jaxkd has none.

Frozen teachers are not covered: they hold no optimizer state and may keep bfloat16 parameters
(:func:`jaxkd.participants.cast_params`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Policy:
    """The dtypes of a trained participant: parameters (and optimizer state), compute, outputs."""

    param_dtype: jnp.dtype
    compute_dtype: jnp.dtype
    output_dtype: jnp.dtype

    def cast_to_param(self, tree: Any) -> Any:
        return _cast(tree, self.param_dtype)

    def cast_to_compute(self, tree: Any) -> Any:
        return _cast(tree, self.compute_dtype)

    def cast_to_output(self, tree: Any) -> Any:
        return _cast(tree, self.output_dtype)


def _cast(tree: Any, dtype: jnp.dtype) -> Any:
    """Every floating leaf of ``tree`` in ``dtype`` (integer and boolean leaves as they are)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


_F32, _BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
POLICIES: dict[str, Policy] = {
    "float32": Policy(_F32, _F32, _F32),
    "bfloat16": Policy(_F32, _BF16, _F32),
}
#: Names refused with the reason (a ValueError says it).
REFUSED = {
    "float16": "jaxkd has no loss scaling, so float16 gradients underflow (values below ~6e-8 flush to zero); "
               "use 'bfloat16' (float32's exponent range, no scaling needed)",
}


def policy(name: str) -> Policy:
    """The policy named ``name``, one of :data:`POLICIES` (``"float32"``, ``"bfloat16"``).

    Raises:
      ValueError: ``"float16"`` (with the reason), or any other unknown name (listing the valid ones).
    """
    if isinstance(name, str) and name in POLICIES:
        return POLICIES[name]
    if isinstance(name, str) and name in REFUSED:
        raise ValueError(f"precision {name!r} is not supported: {REFUSED[name]}")
    raise ValueError(f"unknown precision {name!r}; valid: {sorted(POLICIES)}")


def model_kwargs(p: Policy, kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A zoo model spec's keyword arguments (:func:`jaxkd.models.get`) under policy ``p``: ``dtype`` set to its
    compute dtype (zoo parameters are float32 and its logits float32 whatever ``dtype``).

    Raises:
      ValueError: ``kwargs`` already sets another ``dtype`` (two sources for one setting).
    """
    kwargs = dict(kwargs or {})
    if p.param_dtype != _F32 or p.output_dtype != _F32:
        raise ValueError(f"zoo models keep float32 parameters and logits; policy {p} cannot be applied")
    if "dtype" in kwargs and jnp.dtype(kwargs["dtype"]) != p.compute_dtype:
        raise ValueError(f"the model's kwargs set dtype={kwargs['dtype']!r} but the precision policy computes in "
                         f"{p.compute_dtype}: set the precision only")
    return {**kwargs, "dtype": p.compute_dtype}


def lm_config(p: Policy, config: Any) -> Any:
    """A :class:`jaxkd.models.lm.LMConfig` under policy ``p``: ``dtype`` its compute dtype, ``param_dtype`` its
    parameter dtype (the LM's logits are float32 whatever ``dtype``)."""
    from jaxkd.models.lm import LMConfig  # not at import: ``import jaxkd`` stays light

    if not isinstance(config, LMConfig):
        raise ValueError(f"lm_config takes a jaxkd.models.lm.LMConfig, got {type(config).__name__}")
    if p.output_dtype != _F32:
        raise ValueError(f"the LM's logits are float32; policy {p} cannot be applied")
    return dataclasses.replace(config, dtype=p.compute_dtype, param_dtype=p.param_dtype)
