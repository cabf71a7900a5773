"""Differentiable image warping and gradient reversal, for methods that learn an augmentation (HARD).

* :func:`affine_warp` is PyTorch's ``F.grid_sample(x, F.affine_grid(theta, size, align_corners=False),
  mode="bilinear", padding_mode="zeros", align_corners=False)`` for NHWC images: differentiable in the image
  and in ``theta`` (a spatial transformer, Jaderberg et al., "Spatial Transformer Networks", NeurIPS 2015).
* :func:`reverse_gradient` is the identity whose gradient is negated (Ganin & Lempitsky, "Unsupervised
  Domain Adaptation by Backpropagation", ICML 2015): a min-max objective as one minimized scalar;
  :func:`scale_gradient` the identity whose gradient is multiplied by a constant (a learning-rate factor for
  the parameters behind it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["IDENTITY_AFFINE", "affine_warp", "reverse_gradient", "scale_gradient"]

#: The ``[2, 3]`` affine matrix that leaves an image unchanged.
# A NumPy constant: a jnp array here would start the XLA backend at import (before jax.distributed.initialize).
IDENTITY_AFFINE = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)


@jax.custom_vjp
def reverse_gradient(tree):
    """``tree`` unchanged; its cotangent is negated: what is upstream of it *ascends* the loss downstream."""
    return tree


def _reverse_fwd(tree):
    return tree, None


def _reverse_bwd(_, cotangent):
    return (jax.tree.map(jnp.negative, cotangent),)


reverse_gradient.defvjp(_reverse_fwd, _reverse_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_gradient(tree, scale: float):
    """``tree`` unchanged; its cotangent is multiplied by ``scale`` (a Python number)."""
    return tree


def _scale_fwd(tree, scale):
    return tree, None


def _scale_bwd(scale, _, cotangent):
    return (jax.tree.map(lambda g: g * scale, cotangent),)


scale_gradient.defvjp(_scale_fwd, _scale_bwd)


def affine_warp(images: jax.Array, theta: jax.Array) -> jax.Array:
    """``images`` ``[B, H, W, C]`` resampled through the per-example affine maps ``theta`` ``[B, 2, 3]``.

    Output pixel ``(i, j)`` sits at normalized coordinates ``(x, y) = ((2j + 1)/W − 1, (2i + 1)/H − 1)``
    (pixel centres, ``align_corners=False``); it reads the input bilinearly at ``theta @ (x, y, 1)``, with
    zeros outside the image. The identity ``theta`` returns ``images``.
    """
    if images.ndim != 4:
        raise ValueError(f"affine_warp takes [batch, height, width, channels] images, got shape {images.shape}")
    b, h, w, c = images.shape
    if theta.shape != (b, 2, 3):
        raise ValueError(f"theta must be [batch, 2, 3] = {(b, 2, 3)}, got {theta.shape}")
    images = jnp.asarray(images, jnp.promote_types(images.dtype, jnp.float32))
    theta = jnp.asarray(theta, images.dtype)
    xs = (2.0 * jnp.arange(w, dtype=images.dtype) + 1.0) / w - 1.0
    ys = (2.0 * jnp.arange(h, dtype=images.dtype) + 1.0) / h - 1.0
    grid = jnp.stack([*jnp.meshgrid(xs, ys, indexing="xy"), jnp.ones((h, w), images.dtype)], axis=-1)  # [H, W, 3]
    source = jnp.einsum("hwk,bjk->bhwj", grid, theta)  # [B, H, W, 2]: (x, y) normalized
    ix = ((source[..., 0] + 1.0) * w - 1.0) / 2.0
    iy = ((source[..., 1] + 1.0) * h - 1.0) / 2.0
    x0, y0 = jnp.floor(ix), jnp.floor(iy)
    batch = jnp.arange(b)[:, None, None]

    def tap(yi, xi):
        inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
        values = images[batch, jnp.clip(yi, 0, h - 1).astype(jnp.int32), jnp.clip(xi, 0, w - 1).astype(jnp.int32)]
        return jnp.where(inside[..., None], values, 0.0)

    wx1, wy1 = ix - x0, iy - y0
    wx0, wy0 = 1.0 - wx1, 1.0 - wy1
    return ((wy0 * wx0)[..., None] * tap(y0, x0) + (wy0 * wx1)[..., None] * tap(y0, x0 + 1)
            + (wy1 * wx0)[..., None] * tap(y0 + 1, x0) + (wy1 * wx1)[..., None] * tap(y0 + 1, x0 + 1))
