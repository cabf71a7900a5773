"""A drop-in ``conv_general_dilated`` whose kernel gradient is one GEMM on CPU.

XLA's CPU backend computes the gradient of a convolution's kernel as another convolution whose
"window" is the whole output feature map; on large maps this is pathologically slow (measured with
``benchmarks/conv_grad.py``: a 3x3, 64->64 convolution on 64x32x32 inputs takes 86 ms forward and
~1970 ms for the kernel gradient). Written as im2col + one matrix product, ``dW = patches(x)ᵀ · dY``,
the same gradient takes ~260 ms. The forward pass and the input gradient stay XLA's own.

The GEMM form wins when the output map is large and the channels are not tiny; on small maps XLA's
own is as fast or faster. The rule below (``output pixels · C_in · C_out >= 2**20``) was read off that
benchmark's table on a 2-core x86 CPU; it only picks between two exact computations.

Used by the jaxkd CIFAR models through ``nn.Conv(conv_general_dilated=conv_general_dilated)``; it
changes neither the parameters nor the results (a test checks the gradients against ``lax``'s), and on
GPU/TPU, or for grouped/dilated/non-NHWC convolutions, it is exactly ``lax.conv_general_dilated``.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")
_IM2COL_MIN_WORK = 2**20  # output pixels x C_in x C_out (per example) from which im2col is faster


def _conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


def _kernel_grad(x, g, kernel_shape, strides, padding):
    """``dW[i, j, c, d] = Σ_{b,h,w} x_pad[b, s·h + i, s·w + j, c] · g[b, h, w, d]`` as one GEMM."""
    kh, kw, cin, cout = kernel_shape
    b, ho, wo, _ = g.shape
    xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    sh, sw = strides
    patches = [
        lax.slice(xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, cin), (1, sh, sw, 1))
        for i in range(kh)
        for j in range(kw)
    ]
    cols = jnp.concatenate(patches, axis=-1).reshape(b * ho * wo, kh * kw * cin)
    dw = lax.dot_general(
        cols, g.reshape(b * ho * wo, cout), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    return dw.reshape(kh, kw, cin, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_im2col_grad(x, w, strides, padding):
    return _conv(x, w, strides, padding)


def _fwd(x, w, strides, padding):
    return _conv(x, w, strides, padding), (x, w)


def _bwd(strides, padding, residuals, g):
    x, w = residuals
    _, input_vjp = jax.vjp(lambda x_: _conv(x_, w, strides, padding), x)
    (dx,) = input_vjp(g)
    dw = _kernel_grad(x, g, w.shape, strides, padding).astype(w.dtype)
    return dx, dw


_conv_im2col_grad.defvjp(_fwd, _bwd)


def _is_plain_nhwc(lhs, rhs, dimension_numbers) -> bool:
    if dimension_numbers is None or lhs.ndim != 4:
        return False
    expected = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == expected


def conv_general_dilated(
    lhs,
    rhs,
    window_strides: Sequence[int],
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
):
    """``lax.conv_general_dilated`` with the CPU-friendly kernel gradient where it applies."""
    plain = (
        jax.default_backend() == "cpu"
        and not isinstance(padding, str)
        and all(d in (None, 1) for d in (lhs_dilation or (1,)) + (rhs_dilation or (1,)))
        and feature_group_count == 1
        and batch_group_count == 1
        and precision is None
        and preferred_element_type is None
        and _is_plain_nhwc(lhs, rhs, dimension_numbers)
    )
    if not plain:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type,
        )
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    strides = tuple(int(s) for s in window_strides)
    kh, kw, cin, cout = rhs.shape
    out_pixels = ((lhs.shape[1] + sum(padding[0]) - kh) // strides[0] + 1) * (
        (lhs.shape[2] + sum(padding[1]) - kw) // strides[1] + 1
    )
    if out_pixels * cin * cout < _IM2COL_MIN_WORK:
        return _conv(lhs, rhs, strides, padding)
    return _conv_im2col_grad(lhs, rhs, strides, padding)
