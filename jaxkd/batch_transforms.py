"""Jittable batch transforms for image classifiers: mixup, CutMix, the inception crop and flips.

Pure functions of arrays and keys (static output shapes), the pieces of the batch-transform methods of
:mod:`jaxkd.methods.augment`, which the train step runs inside its compiled program (``Method.prepare``).
Images are ``[B, H, W, C]`` floats.

Padding examples (a batch's ``mask``) are never mixed into real ones: :func:`mix_partners` permutes the valid
rows among themselves and leaves every padding row paired with itself.

* mixup — Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018; for distillation, Choi et al.,
  "Understanding the Role of Mixup in Knowledge Distillation: An Empirical Study", WACV 2023
  (github.com/hchoi71/MIX-KD), and Beyer et al., "Knowledge distillation: A good teacher is patient and
  consistent", CVPR 2022 (big_vision ``big_vision/utils.py:mixup``).
* CutMix — Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable Features",
  ICCV 2019 (github.com/clovaai/CutMix-PyTorch ``train.py``, commit 9dc8245: ``rand_bbox`` and the λ
  adjustment after it).
* inception crop — Szegedy et al., "Going Deeper with Convolutions", CVPR 2015, as big_vision's
  ``inception_crop`` preprocessing op samples it (``tf.image.sample_distorted_bounding_box``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxkd.batch import MIX_LAMBDA, MIX_PARTNER
from jaxkd.checks import check_number, check_positive

Array = jax.Array

__all__ = [
    "check_crop_ranges",
    "crop_and_resize",
    "cutmix_box_mask",
    "cutmix_images",
    "flip_left_right",
    "inception_crop_boxes",
    "mix_partners",
    "mixup_images",
    "sample_mix_lambda",
    "with_mix",
]


def _check_images(images: Array, who: str) -> None:
    if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"{who} takes float images [B, H, W, C], got shape {tuple(images.shape)} and dtype "
                         f"{images.dtype}")


def mix_partners(rng: Array, batch_size: int, valid: Array | None = None) -> Array:
    """The row each example is mixed with, int32 ``[B]``: a uniformly random permutation of the valid rows
    among themselves (``torch.randperm`` over the batch when every row is valid); each invalid row is its own
    partner, so padding never enters a real example.

    How: valid rows first (in order), a random order of the first ``n`` slots (``n`` valid rows), and the
    invalid slots kept in place."""
    rows = jnp.arange(batch_size)
    if valid is None:
        return jax.random.permutation(rng, batch_size).astype(jnp.int32)
    valid = jnp.asarray(valid, bool)
    slots = jnp.argsort(~valid, stable=True)  # slot s holds row slots[s]: the valid rows first
    n = jnp.sum(valid)
    keys = jnp.where(rows < n, jax.random.uniform(rng, (batch_size,)), 2.0 + rows)
    shuffled = jnp.argsort(keys)  # a random permutation of the first n slots; the others stay in place
    partner = jnp.zeros(batch_size, jnp.int32).at[slots].set(slots[shuffled].astype(jnp.int32))
    return partner


def sample_mix_lambda(rng: Array, alpha: float, shape: tuple[int, ...] = ()) -> Array:
    """``λ ~ Beta(α, α)``, float32 of ``shape`` (``()``: one for the batch, as mixup's and CutMix's official
    code draw it)."""
    check_positive("alpha", alpha)
    return jax.random.beta(rng, alpha, alpha, shape, jnp.float32)


def mixup_images(images: Array, partner: Array, lam: Array) -> Array:
    """``x̃_i = λ_i·x_i + (1 − λ_i)·x_partner[i]``, with ``lam`` a scalar or ``[B]``; computed in float32,
    returned in the images' dtype."""
    _check_images(images, "mixup_images")
    x = images.astype(jnp.float32)
    lam = jnp.broadcast_to(jnp.asarray(lam, jnp.float32), (x.shape[0],))[:, None, None, None]
    return (lam * x + (1.0 - lam) * x[partner]).astype(images.dtype)


def cutmix_box_mask(rng: Array, lam: Array, height: int, width: int) -> tuple[Array, Array]:
    """CutMix's box for a target ``λ`` and the ``λ`` it actually gives: ``(inside [H, W] bool, λ_exact)``.

    As the official ``rand_bbox``: a box of side ``int(H·√(1 − λ))`` by ``int(W·√(1 − λ))`` centred on a
    uniformly drawn pixel, clipped to the image (corners ``c − side // 2`` and ``c + side // 2``); then
    ``λ_exact = 1 − (pasted area) / (H·W)``, the fraction of the image that stays example ``i``'s.
    """
    ky, kx = jax.random.split(rng)
    cut = jnp.sqrt(1.0 - jnp.asarray(lam, jnp.float32))
    cut_h = jnp.floor(height * cut).astype(jnp.int32)
    cut_w = jnp.floor(width * cut).astype(jnp.int32)
    cy = jax.random.randint(ky, (), 0, height)
    cx = jax.random.randint(kx, (), 0, width)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    lam_exact = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)
    return inside, lam_exact


def cutmix_images(images: Array, partner: Array, inside: Array) -> Array:
    """Example ``i`` with the pixels ``inside`` the box taken from example ``partner[i]``."""
    _check_images(images, "cutmix_images")
    return jnp.where(inside[None, :, :, None], images[partner], images)


def flip_left_right(rng: Array, images: Array, probability: float = 0.5) -> Array:
    """Each image mirrored left-right with ``probability`` (big_vision's ``flip_lr``: one coin per image)."""
    _check_images(images, "flip_left_right")
    flip = jax.random.bernoulli(rng, probability, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def check_crop_ranges(area_range: tuple[float, float], ratio_range: tuple[float, float]) -> None:
    """``0 < area_range[0] <= area_range[1] <= 1`` and ``0 < ratio_range[0] <= ratio_range[1]``, else
    ``ValueError``."""
    for name, value in (("area_range", area_range), ("ratio_range", ratio_range)):
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ValueError(f"{name} must be a pair (low, high), got {value!r}")
    check_number("area_range[0]", area_range[0], low=0.0, low_open=True, high=1.0)
    check_number("area_range[1]", area_range[1], low=area_range[0], high=1.0)
    check_positive("ratio_range[0]", ratio_range[0])
    check_number("ratio_range[1]", ratio_range[1], low=ratio_range[0])


def inception_crop_boxes(rng: Array, batch_size: int, height: int, width: int, *,
                         area_range: tuple[float, float] = (0.05, 1.0),
                         ratio_range: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> Array:
    """Random-resized-crop boxes ``[B, 4]`` as ``(top, left, box_height, box_width)`` in pixels.

    Per example and attempt: an area fraction ``s ~ U(area_range)`` and an aspect ratio ``r`` (width over
    height) log-uniform in ``ratio_range``, giving ``w = √(s·H·W·r)``, ``h = √(s·H·W/r)``; the first of
    ``attempts`` draws that fits inside the image is used, with its corner uniform over the positions where
    it fits; if none fits, the whole image. This is torchvision's ``RandomResizedCrop`` sampling (10 attempts,
    log-uniform ratio, though its fallback is a centre crop); big_vision's op,
    ``tf.image.sample_distorted_bounding_box``, makes up to 100 attempts and falls back to the whole image. The
    sides are not rounded to whole pixels (the resize interpolates), unlike TF's integer boxes. big_vision's
    defaults: ``area_range=(0.05, 1)`` (``area_min=5``), TF's ratio range ``(3/4, 4/3)``.
    """
    check_crop_ranges(area_range, ratio_range)
    k_area, k_ratio, k_y, k_x = jax.random.split(rng, 4)
    shape = (batch_size, attempts)
    area = jax.random.uniform(k_area, shape, jnp.float32, area_range[0], area_range[1]) * (height * width)
    log_ratio = jax.random.uniform(k_ratio, shape, jnp.float32, math.log(ratio_range[0]), math.log(ratio_range[1]))
    ratio = jnp.exp(log_ratio)
    w = jnp.sqrt(area * ratio)
    h = jnp.sqrt(area / ratio)
    fits = (w <= width) & (h <= height)
    first = jnp.argmax(fits, axis=1)  # the first attempt that fits (0 when none does: replaced below)
    any_fits = jnp.any(fits, axis=1)
    pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]
    h = jnp.where(any_fits, pick(h), float(height))
    w = jnp.where(any_fits, pick(w), float(width))
    top = jax.random.uniform(k_y, (batch_size,), jnp.float32) * (height - h)
    left = jax.random.uniform(k_x, (batch_size,), jnp.float32) * (width - w)
    return jnp.stack([top, left, h, w], axis=1)


def crop_and_resize(images: Array, boxes: Array, out_height: int | None = None,
                    out_width: int | None = None) -> Array:
    """Each image's box ``(top, left, height, width)`` resized to ``out_height × out_width`` (default: the
    input size) by bilinear interpolation without antialiasing (big_vision's ``inception_crop`` default
    ``method="bilinear", antialias=False``): ``jax.image.scale_and_translate`` per example, vmapped, so the
    output size is static. The box ``(0, 0, H, W)`` at the input size returns the image unchanged."""
    _check_images(images, "crop_and_resize")
    _, height, width, channels = images.shape
    out_height, out_width = out_height or height, out_width or width

    def one(image, box):
        top, left, h, w = box[0], box[1], box[2], box[3]
        scale = jnp.stack([out_height / h, out_width / w])
        # scale_and_translate maps input coordinate u to output coordinate u·scale + translation.
        translation = -jnp.stack([top, left]) * scale
        out = jax.image.scale_and_translate(image.astype(jnp.float32), (out_height, out_width, channels), (0, 1),
                                            scale, translation, method="linear", antialias=False)
        return out.astype(images.dtype)

    return jax.vmap(one)(images, boxes.astype(jnp.float32))


def with_mix(batch, key: str, images: Array, partner: Array, lam: Array, valid: Array | None) -> dict:
    """``batch`` with ``batch[key]`` replaced by the mixed ``images`` and the mix recorded for label losses:
    :data:`~jaxkd.batch.MIX_PARTNER` and :data:`~jaxkd.batch.MIX_LAMBDA` (``[B]``; ``λ = 1`` on invalid rows,
    which are their own partners). A batch is mixed once: a second mix would need a third label per example."""
    if MIX_PARTNER in batch:
        raise ValueError("the batch is already mixed (it has batch['mix_partner']): use one of mixup and cutmix "
                         "per step")
    lam = jnp.broadcast_to(jnp.asarray(lam, jnp.float32), partner.shape)
    if valid is not None:
        lam = jnp.where(jnp.asarray(valid, bool), lam, 1.0)
    return {**batch, key: images, MIX_PARTNER: partner.astype(jnp.int32), MIX_LAMBDA: lam}
