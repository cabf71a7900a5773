"""Image augmentation: random shifts, crops and flips of a whole uint8 batch at once.

:func:`augment` applies one of :data:`AUGMENTATIONS` with the offsets and flips drawn from a NumPy
generator.  :class:`jaxkd.data.Loader` draws them for each global batch with
``default_rng([seed, 1, epoch, step])`` and keeps this process's rows, so an example's augmentation does
not depend on how many processes share the batch.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

from jaxkd.checks import check_choice, check_int

__all__ = ["AUGMENTATIONS", "augment"]

Augmentation = Literal["none", "shift", "crop_flip"]
AUGMENTATIONS: tuple[str, ...] = ("none", "shift", "crop_flip")


class _Draws(NamedTuple):
    """The random draws of one batch's augmentation (one entry per example), see :func:`augment`."""

    pad: int
    dy: np.ndarray | None  # crop offsets, rows (None when pad == 0)
    dx: np.ndarray | None  # crop offsets, columns
    flip: np.ndarray | None  # bool, flip horizontally (crop_flip only)

    def rows(self, lo: int, hi: int) -> _Draws:
        """The draws of examples ``lo:hi`` only."""
        take = lambda a: None if a is None else a[lo:hi]  # noqa: E731
        return _Draws(self.pad, take(self.dy), take(self.dx), take(self.flip))


def _draw(mode: str, b: int, rng: np.random.Generator, pad: int | None) -> _Draws:
    """Draws the offsets (and flips) of ``b`` examples, in :func:`augment`'s order."""
    if pad is None:
        pad = 1 if mode == "shift" else 4
    dy = dx = flip = None
    if pad > 0:
        dy = rng.integers(0, 2 * pad + 1, size=b)
        dx = rng.integers(0, 2 * pad + 1, size=b)
    if mode == "crop_flip":
        flip = rng.random(b) < 0.5
    return _Draws(pad, dy, dx, flip)


def _apply(images: np.ndarray, draws: _Draws) -> np.ndarray:
    """Applies drawn offsets/flips to uint8 ``[B, H, W, C]`` (B = the draws' length)."""
    b, h, w, c = images.shape
    pad = draws.pad
    if draws.dy is not None:
        padded = np.zeros((b, h + 2 * pad, w + 2 * pad, c), dtype=images.dtype)
        padded[:, pad : pad + h, pad : pad + w] = images
        # All H x W windows of each padded image, as a view:
        # [B, 2 * pad + 1, 2 * pad + 1, C, H, W]; pick one window per image.
        windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(1, 2))
        out = np.ascontiguousarray(
            windows[np.arange(b), draws.dy, draws.dx].transpose(0, 2, 3, 1)
        )
    else:
        out = images.copy()
    if draws.flip is not None:
        out[draws.flip] = out[draws.flip, :, ::-1]
    return out


def augment(
    images: np.ndarray,
    mode: Augmentation,
    rng: np.random.Generator,
    *,
    pad: int | None = None,
) -> np.ndarray:
    """Random augmentation of a uint8 batch ``[B, H, W, C]`` (shape and dtype kept).

    Args:
        images: the batch.
        mode: ``"none"`` (returned unchanged), ``"shift"`` (zero-pad by ``pad``
            pixels, default 1, and crop back to ``H x W`` at a random offset: random
            translations by up to ``pad`` pixels, right for 8x8 digits), or
            ``"crop_flip"`` (zero-pad by ``pad``, default 4, random crop, then flip
            horizontally with probability 1/2: the CIFAR standard).
        rng: the NumPy generator that draws the offsets and flips (in this order:
            ``B`` row offsets, ``B`` column offsets, ``B`` flips).
        pad: padding in pixels (see ``mode``): None (the default) or an integer ``>= 0``.

    Raises:
        ValueError: ``mode`` is not one of :data:`AUGMENTATIONS`, or ``pad`` is not None or an
            integer ``>= 0``.
    """
    check_choice("mode", mode, AUGMENTATIONS)
    if pad is not None:
        check_int("pad", pad, low=0)
    if mode == "none":
        return images
    return _apply(images, _draw(mode, images.shape[0], rng, pad))
