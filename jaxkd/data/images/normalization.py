"""Image normalization: uint8 pixels to float32 ``(x / 255 - mean) / std`` per channel.

:data:`NORMALIZATION` holds the constants for ``digits`` (computed from its train split; see
:func:`channel_stats`), the usual CIFAR-10/100 train-set statistics and torchvision's ImageNet constants.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

from jaxkd.checks import check_number, check_positive

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORMALIZATION",
    "channel_stats",
    "normalize",
]

# Per-channel mean/std of the images scaled to [0, 1].
# digits: computed from jaxkd's digits `train` split (1297 images, one channel);
# `tests/test_data.py` recomputes them.
DIGITS_MEAN = (0.3054,)
DIGITS_STD = (0.3758,)
# CIFAR: the standard statistics of the 50000 training images.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# ImageNet: torchvision's constants (its pretrained models' and torchdistill's configs' Normalize).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": (DIGITS_MEAN, DIGITS_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "imagenet2012": (IMAGENET_MEAN, IMAGENET_STD),
}


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 ``[N, H, W, C]`` images scaled to [0, 1]."""
    x = np.asarray(images, dtype=np.float64) / 255.0
    axes = tuple(range(x.ndim - 1))
    return tuple(x.mean(axis=axes).tolist()), tuple(x.std(axis=axes).tolist())


def _channel_values(
    name: str, values: float | Sequence[float], channels: int, *, positive: bool
) -> tuple[float, ...]:
    """Checks a per-channel constant (``mean`` or ``std``) and returns it as a tuple of floats.

    ``values`` is one number or a sequence of 1 or ``channels`` finite numbers (``> 0`` when
    ``positive``); a single value applies to every channel.
    """
    if isinstance(values, (numbers.Real, np.generic)) or (
        isinstance(values, np.ndarray) and values.ndim == 0
    ):
        values = (values,)
    elif isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise ValueError(
            f"{name} must be a number or a sequence of 1 or {channels} numbers (one per channel),"
            f" got {name}={values!r}"
        )
    values = tuple(values)
    if len(values) not in (1, channels):
        expected = "1 entry" if channels == 1 else f"1 or {channels} entries"
        raise ValueError(
            f"{name} must have {expected} (one per channel of the {channels}-channel images),"
            f" got {len(values)}: {name}={values!r}"
        )
    check = check_positive if positive else check_number
    for i, value in enumerate(values):
        check(f"{name}[{i}]", value)
    return tuple(float(v) for v in values)


def normalize(
    images: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """uint8 ``[..., W, C]`` -> float32 ``(x / 255 - mean) / std`` per channel.

    Raises:
        ValueError: ``mean`` / ``std`` do not have 1 or ``C`` entries, an entry of ``mean`` is not
            finite, or an entry of ``std`` is not finite and ``> 0``.
    """
    images = np.asarray(images)
    w, c = images.shape[-2:] if images.ndim >= 2 else (1, images.shape[-1])
    return _Normalizer(mean, std, w, c)(images)


class _Normalizer:
    """:func:`normalize` with its per-row constants computed (and checked) once, for ``[..., w, c]``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], w: int, c: int):
        mean = np.broadcast_to(
            np.asarray(_channel_values("mean", mean, c, positive=False), dtype=np.float32), (c,)
        )
        std = np.broadcast_to(
            np.asarray(_channel_values("std", std, c, positive=True), dtype=np.float32), (c,)
        )
        # NumPy is slow to broadcast a length-C vector over a short last axis (its
        # inner loops run C long); apply it to whole [W * C] rows instead.
        self.scale = np.tile(1.0 / (255.0 * std), w)
        self.offset = np.tile(mean / std, w)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = images.astype(np.float32).reshape(-1, self.scale.shape[0])
        out *= self.scale
        out -= self.offset
        return out.reshape(images.shape)
