"""Argument checks shared by every part of jaxkd: losses, methods, models, data and experiment configs.

Each check raises ``ValueError`` naming the argument, what was expected and what was given. Values that
are traced (inside ``jit``/``grad``) cannot be inspected; their checks are skipped here, and the jitted
step reports what only the values can tell (non-finite loss, labels out of range) through flags it
checks on the host (see :mod:`jaxkd.steps`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import jax
import numpy as np

#: Temperatures outside this range are refused: below it ``T²`` (Hinton's scale) underflows the KD term
#: to nothing (``T = 1e-30`` gives exactly 0 and training silently runs on CE alone); above it the
#: tempered distributions are uniform to float32 precision and ``T²·KL`` is rounding noise (``T = 1e30``
#: overflows to inf). The KD literature uses ``0.5 <= T <= 20``.
TEMPERATURE_RANGE = (1e-2, 1e2)


def is_concrete(x: Any) -> bool:
    """True when ``x`` has a value now (not a tracer inside jit/grad), so it can be checked on the host."""
    return not isinstance(x, jax.core.Tracer)


def dtype_of(x: Any) -> np.dtype:
    """The dtype of an array-like without reading its values (no device transfer for jax arrays)."""
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x)


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
) -> None:
    """``value`` is a real number (not a string or bool) in the interval ``[low, high]``.

    ``low_open`` / ``high_open`` exclude the ends; ``finite`` (default) refuses ``±inf`` and NaN. A traced
    scalar passes (its value is unknown until the step runs); a traced array of another shape does not.
    """
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be a number, got {name}={_describe(value)}")
    if not is_concrete(value):
        if np.shape(value) != ():
            raise ValueError(f"{name} must be a scalar, got an array of shape {np.shape(value)}")
        return
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        if np.shape(value) != () or not np.issubdtype(np.asarray(value).dtype, np.number):
            raise ValueError(f"{name} must be a scalar number, got {name}={_describe(value)}")
        number = float(np.asarray(value))
    elif isinstance(value, numbers.Real):
        number = float(value)
    else:
        raise ValueError(f"{name} must be a number, got {name}={_describe(value)}")
    if math.isnan(number) or (finite and math.isinf(number)):
        raise ValueError(f"{name} must be a finite number, got {name}={value!r}")
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{name} must lie in {left}{lo}, {hi}{right}, got {name}={value!r}")


def check_positive(name: str, value: Any) -> None:
    """A finite number ``> 0``."""
    check_number(name, value, low=0.0, low_open=True)


def check_nonnegative(name: str, value: Any) -> None:
    """A finite number ``>= 0``."""
    check_number(name, value, low=0.0)


def check_in_range(name: str, value: Any, low: float, high: float) -> None:
    """A finite number in the closed interval ``[low, high]``."""
    check_number(name, value, low=low, high=high)


def check_temperature(name: str, value: Any) -> None:
    """A temperature in :data:`TEMPERATURE_RANGE` (see there for why the range is bounded)."""
    check_number(name, value, low=TEMPERATURE_RANGE[0], high=TEMPERATURE_RANGE[1])


def check_int(name: str, value: Any, *, low: int | None = None) -> int:
    """An integer (Python or NumPy, not bool or float) ``>= low``; returns it as a Python int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {name}={_describe(value)}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {name}={value!r}")
    return int(value)


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {name}={value!r}")


def check_same_logits(student_logits: Any, teacher_logits: Any) -> None:
    """Student and teacher logits agree exactly in shape; a vocabulary mismatch gets its own message."""
    s, t = np.shape(student_logits), np.shape(teacher_logits)
    if len(s) == 0 or len(t) == 0:
        raise ValueError(f"logits must have a class axis, got shapes student={s} teacher={t}")
    if s[-1] != t[-1]:
        raise ValueError(
            f"student and teacher disagree on the number of classes (vocabulary): student has {s[-1]}, "
            f"teacher has {t[-1]} (shapes {s} and {t}); distill between models over the same classes"
        )
    if s != t:
        raise ValueError(f"student and teacher logits must have the same shape, got {s} and {t}")


def check_labels(labels: Any, logits: Any) -> None:
    """Integer labels of shape ``logits.shape[:-1]``; their values in ``[0, C)`` when they are concrete.

    Traced labels cannot be checked here: label losses return NaN for an out-of-range label, and the
    train step flags it.
    """
    if np.shape(labels) != np.shape(logits)[:-1]:
        raise ValueError(
            f"labels must have shape logits.shape[:-1]={np.shape(logits)[:-1]}, got {np.shape(labels)}"
        )
    check_label_values(labels, np.shape(logits)[-1])


def check_label_values(labels: Any, num_classes: int, *, where: Any = None, name: str = "labels") -> None:
    """Integer ``labels`` whose values (where ``where`` is true, when they are concrete) lie in
    ``[0, num_classes)``; the error names the first bad label and its index."""
    if not np.issubdtype(dtype_of(labels), np.integer):
        raise ValueError(f"{name} must be integers, got dtype {dtype_of(labels)}")
    if not (is_concrete(labels) and is_concrete(where)) or not np.size(labels):
        return
    # NumPy, not jnp: inside a trace jnp would stage even a constant's min as a tracer.
    values = np.asarray(labels)
    bad = (values < 0) | (values >= num_classes)
    if where is not None:
        bad &= np.asarray(where, bool)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name}: label {int(values[first])} at index {first} is outside [0, num_classes={num_classes}); "
            f"{int(bad.sum())} label(s) out of range"
        )


def check_values_in_range(name: str, values: Any, low: float, high: float) -> None:
    """Every entry of the array ``values`` lies in ``[low, high]`` (checked when concrete)."""
    if not is_concrete(values) or not np.size(values):
        return
    array = np.asarray(values, np.float64)
    lo, hi = float(array.min()), float(array.max())
    if not (lo >= low and hi <= high):  # also refuses NaN
        raise ValueError(f"{name} must lie in [{low:g}, {high:g}], got values in [{lo}, {hi}]")


def check_image_scale(name: str, images: Any) -> None:
    """Refuses floating ``[N, H, W, C]`` images that still hold raw pixel values in ``[0, 255]``.

    The models refuse uint8 images because they would train on unnormalized pixels; the same pixels cast
    to float would train on them silently. Normalized images have negative values and images scaled to
    ``[0, 1]`` stay below 1, so values that are all ``>= 0`` with a maximum above 2 (and at most 255) are
    raw pixels. Only concrete arrays are read; other ranks and dtypes pass.
    """
    if not is_concrete(images) or np.ndim(images) != 4 or not np.issubdtype(dtype_of(images), np.floating):
        return
    if not np.size(images):
        return
    array = np.asarray(images)
    lo, hi = float(array.min()), float(array.max())
    if lo >= 0 and 2 < hi <= 255:
        raise ValueError(
            f"{name} holds {dtype_of(images)} images with values in [{lo:g}, {hi:g}] (raw pixels), but the models "
            "expect normalized images (uint8 is refused for the same reason): divide by 255 and normalize with "
            "jaxkd.data.normalize, or pass the uint8 images to jaxkd.data.Loader, which normalizes them"
        )


def check_teacher_weights(num_teachers: int, weights: Sequence[float] | None) -> np.ndarray:
    """``teacher_weights`` checked (one finite number ``>= 0`` per teacher, not all zero), or ``1/K`` each."""
    if weights is None:
        return np.full((num_teachers,), 1.0 / num_teachers)
    weights = list(weights)
    for i, w in enumerate(weights):
        check_nonnegative(f"teacher_weights[{i}]", w)
    if len(weights) != num_teachers:
        raise ValueError(f"teacher_weights has {len(weights)} entries for {num_teachers} teachers")
    if not sum(weights) > 0:
        raise ValueError(f"at least one teacher weight must be positive, got teacher_weights={weights}")
    return np.asarray(weights, np.float64)
