"""The numerics and the one reduction every loss in :mod:`jaxkd.losses` shares.

Conventions (the same in every loss):

* Logits are ``[..., num_classes]``. Computation happens in at least float32 whatever the input dtype
  (bfloat16/float16 inputs are promoted; float64 stays float64, which is how the tests compare gradients
  with float64 finite differences).
* ``-inf`` — and only ``-inf`` — marks an excluded class (masked vocabulary): it has probability 0,
  contributes 0 to every sum and receives a zero (not NaN) gradient. A row whose logits are all ``-inf``
  has all-zero probabilities. NaN and ``+inf`` are not masks: they propagate (the loss is NaN), so a
  diverged model or a corrupt input is visible instead of training as an excluded class.
* A loss is written once, as a per-example function ``[..., C] -> [...]``, and turned into its public
  form by :func:`per_example_loss`, which adds the keyword arguments ``mask``, ``weights`` and
  ``reduction`` and reduces with :func:`reduce_loss` (the mean over unmasked examples by default; 0 when
  nothing is unmasked). ``reduction="none"`` returns the per-example values.
* Features (the feature, relational and ranking losses) are ``[batch, ...]`` in the model's own layout:
  NHWC maps ``[B, H, W, C]``, token sequences ``[B, N, D]``, embeddings ``[B, D]``. A loss that is a sum
  of per-example terms is a per-example function like the logit losses; a *relational* loss couples the
  examples of the batch (SP's Gram matrices, RKD's distances, CC's correlations): it is written as a
  function of the whole batch and made public by :func:`relational_loss`, whose ``mask`` removes the
  masked examples from every relation (the value equals the loss of the unmasked examples alone), and
  which has only a mean. Under a sharded batch, XLA computes the relation over the global batch.
* Labels are integers in ``[0, C)``. A label outside that range makes its example's loss NaN (inside
  ``jit`` nothing can be raised; outside, :func:`jaxkd.checks.check_labels` raises first).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Reduction = Literal["mean", "sum", "none"]

__all__ = [
    "Reduction",
    "check_batch_reduction",
    "combine_masks",
    "compute_dtype",
    "example_weights",
    "flatten_features",
    "is_masked",
    "l2_normalize",
    "kl_from_log_probs",
    "label_one_hot",
    "log_mixture",
    "log_softmax",
    "masked_logsumexp",
    "per_example_loss",
    "probs",
    "reduce_loss",
    "relational_loss",
    "safe_sqrt",
    "squared_distances",
    "to_float",
    "zero_where_masked",
]


def compute_dtype(x) -> jnp.dtype:
    """The dtype losses compute in: the input's float dtype promoted to at least float32."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        return jnp.dtype(jnp.float32)
    return jnp.promote_types(dtype, jnp.float32)


def to_float(x) -> Array:
    """``x`` as an array of :func:`compute_dtype`."""
    return jnp.asarray(x, compute_dtype(x))


def is_masked(x: Array) -> Array:
    """Where ``x`` is ``-inf`` (an excluded entry). NaN is *not* masked: ``NaN != -inf``."""
    return x == -jnp.inf


def masked_logsumexp(x: Array, where: Array | None = None, *, axis: int = -1, keepdims: bool = False) -> Array:
    """``log Σ exp(x)`` over ``axis``, summing the entries that are selected by ``where`` and not ``-inf``.

    ``-inf`` (with zero gradients) when nothing is selected; excluded entries get a zero gradient, where
    ``jax.nn.logsumexp`` would give NaN for an all-``-inf`` slice. NaN and ``+inf`` in a selected entry
    make the result NaN or ``+inf`` (they propagate).
    """
    x = to_float(x)
    selected = ~is_masked(x)
    if where is not None:
        selected = selected & jnp.broadcast_to(where, x.shape)
    shift = jax.lax.stop_gradient(jnp.max(jnp.where(selected, x, -jnp.inf), axis=axis, keepdims=True))
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    total = jnp.sum(jnp.where(selected, jnp.exp(jnp.where(selected, x - shift, 0.0)), 0.0), axis=axis, keepdims=True)
    nonzero = total > 0
    empty = jnp.where(jnp.isnan(total), jnp.nan, -jnp.inf)  # NaN in a selected entry stays NaN
    out = jnp.where(nonzero, jnp.log(jnp.where(nonzero, total, 1.0)) + shift, empty)
    return out if keepdims else jnp.squeeze(out, axis=axis)


def log_softmax(logits: Array, temperature: float = 1.0) -> Array:
    """``log softmax(logits / T)`` that keeps ``-inf`` entries at ``-inf`` (zero gradient) and maps an
    all-``-inf`` row to all ``-inf`` (zero mass), where ``jax.nn.log_softmax`` returns NaN."""
    x = to_float(logits) / temperature
    lse = masked_logsumexp(x, keepdims=True)
    # A +inf logit makes the normalizer infinite: the whole row is undefined (NaN), not "all but one
    # class excluded" as finite − inf = −inf would say.
    lse = jnp.where(lse == jnp.inf, jnp.nan, lse)
    return jnp.where(is_masked(x), -jnp.inf, x - lse)


def zero_where_masked(log_p: Array) -> Array:
    """``-inf`` -> 0 (zero gradient there), so that ``p·log p`` terms at ``p = 0`` are 0; NaN stays NaN."""
    return jnp.where(is_masked(log_p), 0.0, log_p)


def probs(log_p: Array) -> Array:
    """``exp(log_p)`` with an exact 0 and a zero gradient at ``-inf``."""
    return jnp.where(is_masked(log_p), 0.0, jnp.exp(zero_where_masked(log_p)))


def kl_from_log_probs(log_p: Array, log_q: Array) -> Array:
    """``KL(p ‖ q) = Σ_c p_c (log p_c − log q_c)`` over the last axis.

    ``p_c = 0`` terms are 0 (``0·log 0 = 0``). ``q_c = 0 < p_c`` terms would be ``+∞``; they are dropped
    (the convention DistiLLM uses for masked vocabulary), so a class only ``q`` excludes does not make the
    loss infinite. Both are excluded before any arithmetic: ``-inf`` inputs get zero gradients.
    """
    both = ~is_masked(log_p) & ~is_masked(log_q)
    lp, lq = jnp.where(both, log_p, 0.0), jnp.where(both, log_q, 0.0)
    return jnp.sum(jnp.where(both, jnp.exp(lp) * (lp - lq), 0.0), axis=-1)


def log_mixture(log_a: Array, log_b: Array, w) -> Array:
    """``log(w·a + (1 − w)·b)`` elementwise from ``log a``, ``log b``, for ``w`` in ``[0, 1]``.

    ``-inf`` inputs (zero mass) and ``w ∈ {0, 1}`` are exact; no input gets a NaN gradient (unlike
    ``jnp.logaddexp`` at ``-inf``).
    """
    w = jnp.asarray(w, jnp.result_type(log_a))
    terms = jnp.stack([log_a + jnp.log(w), log_b + jnp.log1p(-w)], axis=-1)
    return masked_logsumexp(terms, axis=-1)


def safe_sqrt(x: Array) -> Array:
    """``sqrt(x)`` with a zero (not infinite or NaN) gradient at ``x = 0``."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), jnp.where(jnp.isnan(x), jnp.nan, 0.0))


def label_one_hot(labels: Array, num_classes: int) -> tuple[Array, Array]:
    """``(one_hot, valid)``: a boolean ``[..., C]`` one-hot of the labels and whether each label lies in
    ``[0, C)``. An out-of-range label has an all-False row; losses turn its example's value into NaN."""
    labels = jnp.asarray(labels)
    valid = (labels >= 0) & (labels < num_classes)
    return labels[..., None] == jnp.arange(num_classes), valid


def combine_masks(*masks: Array | None) -> Array | None:
    """The logical AND of the masks that are given (``None`` when none is)."""
    given = [jnp.asarray(m, bool) for m in masks if m is not None]
    return functools.reduce(jnp.logical_and, given) if given else None


def example_weights(
    shape: tuple[int, ...], mask: Array | None, weights: Array | None, dtype: jnp.dtype = jnp.float32
) -> Array:
    """``mask · weights`` as an array of the examples' ``shape`` (ones where neither is given)."""
    w = jnp.ones(shape, dtype)
    for name, value in (("mask", mask), ("weights", weights)):
        if value is None:
            continue
        if jnp.shape(value) != tuple(shape):
            raise ValueError(f"{name} must have the examples' shape {tuple(shape)}, got {jnp.shape(value)}")
        w = w * jnp.asarray(value, dtype)
    return w


def reduce_loss(
    per_example: Array,
    *,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
    normalizer: Array | float | None = None,
) -> Array:
    """Reduces a per-example loss ``[...]`` to a scalar.

    With ``w = mask · weights``: ``"mean"`` is ``Σ w·l / Σ w`` (0 when ``Σ w = 0``), ``"sum"`` is ``Σ w·l``,
    ``"none"`` returns ``w·l`` unreduced. ``normalizer`` replaces the denominator ``Σ w`` of the mean (0
    still gives 0): a token loss over one micro-batch divided by the *global* count of target tokens
    (:func:`jaxkd.batch.token_normalizer`) accumulates to exactly the full batch's mean, however
    the tokens fall between micro-batches (TRL's ``num_items_in_batch``; trl PR #6006). Examples with ``w = 0`` contribute exactly 0 to the value even
    when it is NaN or infinite (padding may hold anything); every other NaN propagates. Only the value:
    the gradient reaching a masked example is ``0``, and ``0 · NaN`` is NaN, so a masked example whose
    *inputs* are NaN still makes the gradient NaN (the train step then refuses the update). Pad with
    finite values (zeros), as :class:`jaxkd.data.Loader` does.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got reduction={reduction!r}")
    per_example = to_float(per_example)
    if mask is None and weights is None:
        w = None
        weighted = per_example
    else:
        w = example_weights(jnp.shape(per_example), mask, weights, per_example.dtype)
        weighted = jnp.where(w != 0, per_example * w, 0.0)
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return jnp.sum(weighted)
    if normalizer is not None:
        denom = jnp.asarray(normalizer, weighted.dtype)
        if denom.ndim:
            raise ValueError(f"normalizer must be a scalar, got shape {denom.shape}")
        return jnp.where(denom != 0, jnp.sum(weighted) / jnp.where(denom != 0, denom, 1.0), 0.0)
    if w is None:
        return jnp.mean(weighted) if weighted.size else jnp.zeros((), weighted.dtype)
    denom = jnp.sum(w)
    return jnp.where(denom != 0, jnp.sum(weighted) / jnp.where(denom != 0, denom, 1.0), 0.0)


def check_batch_reduction(name: str, reduction: str) -> None:
    """Batch-level losses (DIST's intra-class term, SinKD) couple the examples; only their mean exists."""
    if reduction != "mean":
        raise ValueError(
            f"{name} is a batch-level loss (it couples the examples of the batch), so only "
            f"reduction='mean' is supported, got reduction={reduction!r}"
        )


_REDUCTION_DOC = """
    Reduction (added by :func:`jaxkd.losses.core.per_example_loss`): ``mask`` (boolean) and ``weights``
    (float), both of the examples' shape ``logits.shape[:-1]``, and ``reduction``: ``"mean"`` (default,
    over unmasked examples), ``"sum"``, or ``"none"`` for the per-example values; ``normalizer`` replaces
    the mean's denominator (the global token count under gradient accumulation; see
    :func:`jaxkd.losses.reduce_loss`).
"""


def per_example_loss(fn: Callable) -> Callable:
    """Turns a per-example loss into its public form: the same function plus ``mask``, ``weights`` and
    ``reduction`` keyword arguments, reduced by :func:`reduce_loss`.

    ``fn`` returns ``[...]`` (or a tuple of such arrays — e.g. a method's separate terms — each reduced
    the same way). Written in the spirit of optax's losses, which return unreduced values: every loss
    has exactly one implementation, and one reduction serves them all.
    """

    @functools.wraps(fn)
    def loss(*args, mask: Array | None = None, weights: Array | None = None, reduction: Reduction = "mean",
             normalizer: Array | float | None = None, **kwargs):
        reduce = functools.partial(reduce_loss, mask=mask, weights=weights, reduction=reduction, normalizer=normalizer)
        values = fn(*args, **kwargs)
        if isinstance(values, tuple):
            return tuple(reduce(v) for v in values)
        return reduce(values)

    signature = inspect.signature(fn)
    extra = [
        inspect.Parameter("mask", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Array | None"),
        inspect.Parameter("weights", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Array | None"),
        inspect.Parameter("reduction", inspect.Parameter.KEYWORD_ONLY, default="mean", annotation="Reduction"),
        inspect.Parameter("normalizer", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Array | float | None"),
    ]
    loss.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
    loss.__doc__ = (fn.__doc__ or "").rstrip() + "\n" + _REDUCTION_DOC
    del loss.__wrapped__  # help() and inspect show the public signature above, not fn's
    return loss


# ----- features -----


def flatten_features(x: Array) -> Array:
    """``[B, ...] -> [B, D]`` (row-major, as PyTorch's ``view(B, -1)`` of the same layout), in at least float32."""
    x = to_float(x)
    if x.ndim < 1:
        raise ValueError("features must be [batch, ...], got a scalar")
    return x.reshape(x.shape[0], -1)


def feature_mse(student: Array, teacher: Array, *, mismatch: str) -> Array:
    """Per-example ``mean((student − teacher)²)`` over every value of two ``[B, ...]`` features of one shape
    (:func:`flatten_features` of each, then the mean over the flattened axis): ``[B]``.

    ``mismatch`` is the ``ValueError`` raised when the shapes differ, a ``str.format`` template given the
    two shapes as ``student`` and ``teacher``. The hint/regression loss of FitNets and SimKD.
    """
    if np.shape(student) != np.shape(teacher):
        raise ValueError(mismatch.format(student=np.shape(student), teacher=np.shape(teacher)))
    diff = flatten_features(student) - flatten_features(teacher)
    return jnp.mean(diff * diff, axis=-1)


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """``x / max(‖x‖₂, eps)`` along ``axis`` (PyTorch's ``F.normalize``, which the official codes use):
    a zero vector stays zero with a finite gradient."""
    x = to_float(x)
    norm = safe_sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def squared_distances(a: Array, b: Array | None = None) -> Array:
    """``‖a_i − b_j‖²`` for rows ``a [N, D]``, ``b [M, D]`` (``b = a`` by default), ``[N, M]``, clamped at 0.

    Computed from differences, not from ``‖a‖² + ‖b‖² − 2a·b`` (which cancels catastrophically for
    nearby rows and is what makes RKD's official ``pdist`` need an ``eps``).
    """
    a = to_float(a)
    b = a if b is None else to_float(b)
    diff = a[:, None, :] - b[None, :, :]
    return jnp.sum(diff * diff, axis=-1)


def relational_loss(fn: Callable) -> Callable:
    """Turns a loss of the whole batch into its public form: ``mask`` (boolean ``[B]``, the valid examples)
    and ``reduction`` (only ``"mean"``: a relational loss couples the examples, no per-example value exists).

    ``fn(*args, example_weights=w, **kwargs)`` receives ``w``, a float ``[B]`` of 1 (valid) and 0 (masked)
    — all ones without a mask — and must give the loss of the valid examples alone: every pair or
    relation that involves a masked example is left out, and means are over the valid ones. Masked
    examples may hold anything finite; the tests check the value equals the loss of the subset.
    """

    @functools.wraps(fn)
    def loss(*args, mask: Array | None = None, reduction: Reduction = "mean", **kwargs):
        check_batch_reduction(fn.__name__, reduction)
        batch = jnp.shape(args[0])[0]
        w = example_weights((batch,), mask, None)
        return fn(*args, example_weights=w, **kwargs)

    signature = inspect.signature(fn)
    params = [p for name, p in signature.parameters.items() if name != "example_weights"]
    extra = [
        inspect.Parameter("mask", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Array | None"),
        inspect.Parameter("reduction", inspect.Parameter.KEYWORD_ONLY, default="mean", annotation="Reduction"),
    ]
    loss.__signature__ = signature.replace(parameters=[*params, *extra])
    loss.__doc__ = (fn.__doc__ or "").rstrip() + "\n" + _RELATIONAL_DOC
    del loss.__wrapped__
    return loss


_RELATIONAL_DOC = """
    Batch (added by :func:`jaxkd.losses.core.relational_loss`): ``mask``, boolean ``[B]``, leaves the masked
    examples out of every relation (the value is the loss of the unmasked examples alone; 0 when fewer
    than the loss needs remain); ``reduction`` must be ``"mean"`` (the examples are coupled).
"""
