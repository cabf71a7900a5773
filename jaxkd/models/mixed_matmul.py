"""Matrix products of a mixed-precision model: low-precision operands, float32 accumulation both ways.

Under a bfloat16 policy (:mod:`jaxkd.precision`) an activation times a weight is ``einsum(x_bf16, w_bf16)``.
Left to autodiff, XLA:CPU runs it at a third of its bfloat16 rate: the forward product writes bfloat16
(XLA:CPU's bf16-output kernels run at 280 GFLOP/s on a 2-core AVX-512 machine, its float32-output ones at
695) and the backward products receive the *float32* cotangent of a float32-accumulated output, so they
multiply float32 by bfloat16 (as slow as float32, or slower). :func:`einsum` keeps the arithmetic of
``torch.autocast`` / MaxText's bf16 matmuls — bfloat16 operands, float32 accumulation, the result rounded
to the compute dtype — and makes both passes take the fast path: the forward product accumulates and is
written in float32 and then rounded, and the backward pass rounds the incoming cotangent to the operands'
dtype before its two products, which again accumulate in float32 (``jax.custom_vjp``):

    y  = round_c(x · w)          (x · w accumulated in float32; round_c: to the compute dtype c)
    dx = round_x(round_b(dy) · wᵀ),   dw = round_w(xᵀ · round_b(dy))      (b: the operands' dtype)

With float32 operands it is ``jnp.einsum`` itself (the same program as before). Inside qwix's
interception (LoRA adapters, int8 weights: :mod:`jaxkd.models.lora`, :mod:`jaxkd.models.quantize`, which
replace ``jnp.einsum`` while the model runs) it is plain ``jnp.einsum`` too, so qwix sees the product it
adapts and its parameters get their gradients through autodiff.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["einsum"]

# The function itself, captured when jaxkd is imported: qwix swaps jax.numpy.einsum for an interceptor only
# while an adapted model runs, so a different object there means "inside qwix's interception".
_JNP_EINSUM = jnp.einsum


def _split(spec: str) -> tuple[str, str, str]:
    inputs, out = spec.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    for index in sorted(set(lhs + rhs + out)):
        if sum(index in term for term in (lhs, rhs, out)) < 2:
            raise ValueError(f"einsum {spec!r}: index {index!r} appears in one term only (not supported here)")
    return lhs, rhs, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _mixed(spec: str, x: jax.Array, w: jax.Array, out_dtype: jnp.dtype) -> jax.Array:
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(out_dtype)


def _mixed_fwd(spec, x, w, out_dtype):
    return _mixed(spec, x, w, out_dtype), (x, w)


def _mixed_bwd(spec, out_dtype, residuals, g):
    x, w = residuals
    lhs, rhs, out = _split(spec)
    g = g.astype(jnp.promote_types(x.dtype, w.dtype))
    dx = jnp.einsum(f"{out},{rhs}->{lhs}", g, w, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.einsum(f"{lhs},{out}->{rhs}", x, g, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


_mixed.defvjp(_mixed_fwd, _mixed_bwd)


def einsum(spec: str, x: jax.Array, w: jax.Array, *, out_dtype=None) -> jax.Array:
    """``jnp.einsum(spec, x, w)`` for a mixed-precision model (see the module docstring): float32 accumulation
    forward and backward when the operands are narrower than float32, the result in ``out_dtype`` (default:
    the operands' dtype; ``jnp.float32`` for float32 logits). Every index must appear in two of the three
    terms (no index summed within one operand)."""
    operand_dtype = jnp.promote_types(x.dtype, w.dtype)
    out_dtype = jnp.dtype(operand_dtype if out_dtype is None else out_dtype)
    wide = jnp.promote_types(operand_dtype, jnp.float32) == operand_dtype
    if wide or jnp.einsum is not _JNP_EINSUM:
        if out_dtype == operand_dtype:
            return jnp.einsum(spec, x, w)
        return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(out_dtype)
    _split(spec)
    return _mixed(spec, x, w, out_dtype)
