"""Token divergences fused with the output projection: distillation without ``[N, V]`` logits.

A language model's logits are ``hidden @ head``: ``[N, d] @ [d, V]``. With a large vocabulary the
``[N, V]`` logits of student and teacher — and, under autodiff, the several ``[N, V]`` intermediates of the
divergence and their cotangents — are by far the largest arrays of a distillation step.
:func:`fused_linear_divergence` never forms them: it scans over chunks of ``chunk_size`` tokens, and for
each chunk computes the student and teacher logits ``[chunk, V]``, the divergence per token and, in the
same pass, its gradient with respect to the chunk's student logits ``g``; from ``g`` it forms the
gradient with respect to the chunk's hidden states (``g @ headᵀ``) and adds ``hiddenᵀ @ g`` to the
accumulated ``[d, V]`` head gradient. Only those gradients are kept; the backward pass scales them by the
incoming cotangent (a ``jax.custom_vjp``). Peak memory is then ``O(chunk·V + d·V + N·d)`` instead of
``O(N·V)``, at the cost of no extra FLOPs (the logits are not recomputed).

This is the scheme of Liger-Kernel's fused linear JSD (``LigerFusedLinearJSDFunction`` in
``linkedin/Liger-Kernel``, ``src/liger_kernel/ops/fused_linear_jsd.py``; Hsu et al., "Liger Kernel:
Efficient Triton Kernels for LLM Training", 2024), generalized to every token divergence of
:mod:`jaxkd.losses.logit.divergences`: the per-chunk value and logit gradient come from ``jax.vjp`` of the
existing divergence functions, so the fused loss is, up to float rounding, the same function as the
divergence applied to the materialized logits. Where this differs from Liger: the logit gradient and both
parameter gradients are kept in float32 for bfloat16 inputs (Liger casts the logit gradient back to the
input dtype before the two matmuls) and cast to the input dtype only at the end; mask, weights and the
mean follow :func:`jaxkd.losses.reduce_loss` exactly (Liger divides by the count of non-ignored labels);
heads are ``[d, V]``, the layout of a Flax ``Dense`` kernel (Liger's are PyTorch's ``[V, d]``).
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp

from jaxkd.checks import check_in_range, check_int, check_positive, check_temperature, is_concrete
from jaxkd.losses.core import Array, Reduction, compute_dtype, example_weights, to_float
from jaxkd.losses.logit.divergences import (
    forward_kl,
    generalized_jsd,
    js_divergence,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    total_variation,
)

__all__ = ["fused_linear_divergence"]

#: The divergences that can be fused, by name, with the hyper-parameter each one takes (besides T).
_DIVERGENCES = {
    "forward_kl": (forward_kl, None),
    "reverse_kl": (reverse_kl, None),
    "js_divergence": (js_divergence, None),
    "generalized_jsd": (generalized_jsd, "beta"),
    "skew_kl": (skew_kl, "alpha"),
    "skew_reverse_kl": (skew_reverse_kl, "alpha"),
    "total_variation": (total_variation, None),
}


def _project(hidden: Array, head: Array, dtype) -> Array:
    """``hidden @ head`` accumulated in ``dtype`` (float32 for bfloat16 inputs: the logits are float32)."""
    return jnp.matmul(hidden, head, preferred_element_type=dtype).astype(dtype)


def _chunks(x: Array, num_chunks: int, chunk: int) -> Array:
    """``[N, ...] -> [num_chunks, chunk, ...]``, padding the last chunk with zero rows (masked by ``w = 0``)."""
    pad = num_chunks * chunk - x.shape[0]
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(num_chunks, chunk, *x.shape[1:])


def softcap_logits(z: Array, softcap: float | None) -> Array:
    """Gemma's ``final_logit_softcapping``: ``z -> c·tanh(z / c)`` (``None``: ``z`` unchanged)."""
    return z if softcap is None else softcap * jnp.tanh(z / softcap)


def _divergence(static, hyper):
    """The per-token divergence ``(student_logits, teacher_logits) -> [chunk]`` the config names, on the
    soft-capped logits when the config has a cap."""
    name, _, _, _, static_kwargs, softcap = static
    fn = functools.partial(_DIVERGENCES[name][0], **dict(static_kwargs), **hyper, reduction="none")
    if softcap is None:
        return fn
    return lambda zs, zt: fn(softcap_logits(zs, softcap), softcap_logits(zt, softcap))


def _weighted(values: Array, w: Array) -> Array:
    """``w·l`` with masked tokens exactly 0 whatever their value (as :func:`jaxkd.losses.reduce_loss`)."""
    return jnp.where(w != 0, values * w, 0.0)


def _scan(static, hyper, hs, ws, ht, wt, w, *, with_grads: bool):
    """``Σ_i w_i·l_i`` over all tokens, chunk by chunk, and (``with_grads``) its gradients with respect to
    ``hs`` ``[N, d]`` and ``ws`` ``[d, V]`` in the compute dtype."""
    _, chunk, _, _, _, _ = static
    divergence = _divergence(static, hyper)
    n = hs.shape[0]
    num_chunks = max(1, math.ceil(n / chunk))
    dtype = jnp.promote_types(compute_dtype(hs), compute_dtype(ws))
    xs = (_chunks(hs, num_chunks, chunk), _chunks(ht, num_chunks, chunk), _chunks(w, num_chunks, chunk))

    def body(grad_head, x):
        h, t, wc = x
        zs = _project(h, ws, dtype)
        zt = _project(t, wt, dtype)
        if not with_grads:
            return grad_head, jnp.sum(_weighted(divergence(zs, zt), wc))
        values, pullback = jax.vjp(lambda z: divergence(z, zt), zs)
        # d(Σ_i where(w_i ≠ 0, w_i·l_i, 0))/dl_i = w_i: masked and padded rows get a zero cotangent.
        (g,) = pullback(wc.astype(values.dtype))
        grad_head = grad_head + jnp.matmul(h.T, g, preferred_element_type=dtype)
        grad_hidden = jnp.matmul(g, ws.T, preferred_element_type=dtype)
        return grad_head, (jnp.sum(_weighted(values, wc)), grad_hidden)

    init = jnp.zeros(ws.shape, dtype) if with_grads else None
    grad_head, out = jax.lax.scan(body, init, xs)
    if not with_grads:
        return jnp.sum(out)
    sums, grad_hidden = out
    return jnp.sum(sums), grad_hidden.reshape(num_chunks * chunk, -1)[:n], grad_head


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_sum(static, hyper, hs, ws, ht, wt, w):
    """``Σ_i w_i·l_i``; differentiable in ``hs`` and ``ws`` only (the rest gets zero cotangents)."""
    return _scan(static, hyper, hs, ws, ht, wt, w, with_grads=False)


def _fused_sum_fwd(static, hyper, hs, ws, ht, wt, w):
    total, grad_hidden, grad_head = _scan(static, hyper, hs, ws, ht, wt, w, with_grads=True)
    # Only the two gradients are kept for the backward pass (float32 for bfloat16 inputs, so that the
    # cotangent scales them before the one rounding to the input dtype).
    return total, (grad_hidden, grad_head)


def _fused_sum_bwd(static, residuals, cotangent):
    _, _, hs_dtype, ws_dtype, _, _ = static
    grad_hidden, grad_head = residuals
    # None: a zero cotangent for the hyper-parameters, the teacher and the weights (constants).
    return None, (cotangent * grad_hidden).astype(hs_dtype), (cotangent * grad_head).astype(ws_dtype), None, None, None


_fused_sum.defvjp(_fused_sum_fwd, _fused_sum_bwd)


def _per_token(static, hyper, hs, ws, ht, wt, w):
    """``w_i·l_i`` for every token ``[N]`` by a scan whose chunks are rematerialized under autodiff
    (``jax.checkpoint``): any cotangent works, and memory stays per chunk, at the price of recomputing
    each chunk's logits in the backward pass."""
    _, chunk, _, _, _, _ = static
    divergence = _divergence(static, hyper)
    n = hs.shape[0]
    num_chunks = max(1, math.ceil(n / chunk))
    dtype = jnp.promote_types(compute_dtype(hs), compute_dtype(ws))
    ht, wt, w = jax.lax.stop_gradient((ht, wt, w))
    xs = (_chunks(hs, num_chunks, chunk), _chunks(ht, num_chunks, chunk), _chunks(w, num_chunks, chunk))

    @jax.checkpoint
    def body(carry, x):
        h, t, wc = x
        return carry, _weighted(divergence(_project(h, ws, dtype), _project(t, wt, dtype)), wc)

    _, out = jax.lax.scan(body, None, xs)
    return out.reshape(num_chunks * chunk)[:n]


def _check_shapes(student_hidden, student_head, teacher_hidden, teacher_head) -> None:
    for name, x in (
        ("student_hidden", student_hidden),
        ("student_head", student_head),
        ("teacher_hidden", teacher_hidden),
        ("teacher_head", teacher_head),
    ):
        if jnp.ndim(x) != 2:
            shape = "[tokens, dim]" if name.endswith("hidden") else "[dim, vocab]"
            raise ValueError(f"{name} must be {shape} (2-D), got shape {jnp.shape(x)}")
    for who, hidden, head in (("student", student_hidden, student_head), ("teacher", teacher_hidden, teacher_head)):
        if hidden.shape[1] != head.shape[0]:
            raise ValueError(
                f"{who}_hidden's dimension {hidden.shape[1]} does not match {who}_head's input dimension "
                f"{head.shape[0]} (shapes {hidden.shape} and {head.shape}; the head is [dim, vocab])"
            )
    if student_head.shape[1] != teacher_head.shape[1]:
        raise ValueError(
            f"student and teacher disagree on the vocabulary size: student_head has {student_head.shape[1]}, "
            f"teacher_head has {teacher_head.shape[1]} (shapes {student_head.shape} and {teacher_head.shape})"
        )
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"student_hidden and teacher_hidden must have the same number of tokens, got "
            f"{student_hidden.shape[0]} and {teacher_hidden.shape[0]}"
        )


def _hyper_parameters(divergence, temperature, beta, alpha) -> tuple[dict, dict]:
    """``(static, traced)`` keyword arguments of the divergence: concrete numbers are baked into the
    program (so ``generalized_jsd`` picks its branch at trace time); traced ones are passed as arrays."""
    if divergence not in _DIVERGENCES:
        raise ValueError(f"divergence must be one of {tuple(_DIVERGENCES)}, got divergence={divergence!r}")
    fn, takes = _DIVERGENCES[divergence]
    check_temperature("temperature", temperature)
    given = {"beta": beta, "alpha": alpha}
    for name, value in given.items():
        if value is not None and name != takes:
            users = sorted(d for d, (_, p) in _DIVERGENCES.items() if p == name)
            raise ValueError(f"{name} is a hyper-parameter of {users}, not of divergence={divergence!r}")
    kwargs = {"temperature": temperature}
    if takes is not None:
        value = given[takes]
        if value is None:
            value = inspect.signature(fn).parameters[takes].default
        check_in_range(takes, value, 0.0, 1.0)
        kwargs[takes] = value
    static = {k: float(v) for k, v in kwargs.items() if is_concrete(v)}
    # Traced ones as float arrays (they receive a zero cotangent from the custom VJP).
    traced = {k: to_float(v) for k, v in kwargs.items() if not is_concrete(v)}
    return static, traced


def fused_linear_divergence(
    student_hidden: Array,
    student_head: Array,
    teacher_hidden: Array,
    teacher_head: Array,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float | None = None,
    alpha: float | None = None,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
    chunk_size: int = 512,
    normalizer: Array | float | None = None,
    softcap: float | None = None,
) -> Array:
    """A token divergence between ``student_hidden @ student_head`` and ``teacher_hidden @ teacher_head``,
    computed ``chunk_size`` tokens at a time without materializing the ``[N, V]`` logits.

    With ``z_S = h_S W_S`` and ``z_T = h_T W_T`` (``[N, V]``), ``l_i = D(z_S,i, z_T,i)`` the named divergence
    of :mod:`jaxkd.losses.logit.divergences` (student first, at temperature ``T``, no ``T²``) and ``w = mask·weights``,
    the value is exactly that of ``D(z_S, z_T, mask=mask, weights=weights, reduction=reduction)`` on the
    materialized logits (:func:`jaxkd.losses.reduce_loss`): ``"mean"`` is ``Σ w·l / Σ w`` (0, with zero
    gradients, when every token is masked), ``"sum"`` is ``Σ w·l``, ``"none"`` the per-token ``w·l``
    ``[N]``. ``normalizer`` replaces the mean's denominator ``Σ w`` (e.g. the global count of target
    tokens under gradient accumulation; 0 gives 0, as in :func:`jaxkd.losses.reduce_loss`).

    Soft-capping (``softcap = c``): Gemma 2's ``final_logit_softcapping`` (Gemma Team, "Gemma 2: Improving
    Open Language Models at a Practical Size", 2024), ``z -> c·tanh(z / c)``, applied to both the student's
    and the teacher's logits of each chunk before the divergence (and before the temperature), as TRL's chunked
    SFT loss applies it to each chunk's logits (``trl/trainer/sft_trainer.py``, ``_chunk``); the value is
    ``D(c·tanh(z_S/c), c·tanh(z_T/c))`` on the materialized logits, and the gradient includes the cap's
    ``1 − tanh²(z_S/c)``.

    Gradients (``"mean"``/``"sum"``): computed in the forward pass, chunk by chunk, as Liger-Kernel's
    fused linear JSD does — ``g = ∂(Σ w·l)/∂z_S`` from ``jax.vjp`` of the divergence, then
    ``∂/∂h_S = g W_Sᵀ`` and ``∂/∂W_S = Σ_chunks h_Sᵀ g`` — and stored; the backward pass multiplies them
    by the incoming cotangent (``jax.custom_vjp``). Forward-mode differentiation (``jax.jvp``) is therefore
    not available. ``reduction="none"`` has a per-token cotangent, so it is differentiated by ordinary
    autodiff through a scan whose chunks are rematerialized (``jax.checkpoint``): the same memory bound,
    with the chunk logits recomputed in the backward pass.

    Constants: the teacher (``teacher_hidden``, ``teacher_head``), ``mask``, ``weights`` and the
    hyper-parameters receive zero gradients (``stop_gradient`` semantics: the teacher is frozen in
    distillation). ``normalizer`` is differentiated as a divisor.

    Numerics: logits, divergence and gradients are computed in (at least) float32 — bfloat16 inputs are
    multiplied with float32 accumulation — and the gradients are returned in the inputs' dtypes. A
    ragged last chunk is padded with masked zero rows (no effect on value or gradients). Masked tokens
    contribute exactly 0 to the value; as in :func:`jaxkd.losses.reduce_loss`, a masked token whose
    *hidden state* is NaN still makes the gradients NaN (``0·NaN``), so pad with finite values.

    Args:
      student_hidden: ``[N, d]`` the student's final hidden states (tokens flattened).
      student_head: ``[d, V]`` the student's output projection (``hidden @ head`` are its logits; a
        bias-free head — fold a bias into an extra constant hidden feature if needed).
      teacher_hidden: ``[N, d_t]``; teacher_head: ``[d_t, V]``, the same vocabulary ``V``.
      divergence: one of ``forward_kl``, ``reverse_kl``, ``js_divergence``, ``generalized_jsd`` (``beta``,
        TRL's convention, default 0.5), ``skew_kl`` / ``skew_reverse_kl`` (``alpha``, default 0.1),
        ``total_variation``.
      temperature: ``T``; beta, alpha: the divergence's hyper-parameter (refused for one that has none).
      mask, weights: ``[N]`` boolean / float (see :func:`jaxkd.losses.reduce_loss`).
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      chunk_size: tokens per chunk (clamped to ``N``). The temporary memory of the value-and-grad grows
        as ``chunk_size·V`` (about 6 ``[chunk_size, V]`` float32 buffers for a KL, 15 for the
        generalized JSD); too small a chunk underuses the matrix units. The default 512 was measured
        on a 2-core CPU at ``N = 4096``, ``d = 256``, ``V = 32768`` (``benchmarks/fused_linear.py``):
        13–15 % of the unfused temporary memory, 0.6–1.05x the unfused time (1024: 25–30 %).
      normalizer: optional scalar replacing ``Σ w`` in ``"mean"`` (ignored by ``"sum"`` and ``"none"``, as
        in :func:`jaxkd.losses.reduce_loss`).
      softcap: ``c > 0`` (a Python number) to soft-cap both models' logits, or ``None`` (default) for none.
    """
    _check_shapes(student_hidden, student_head, teacher_hidden, teacher_head)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got reduction={reduction!r}")
    chunk_size = check_int("chunk_size", chunk_size, low=1)
    if softcap is not None:
        if not is_concrete(softcap):
            raise ValueError("softcap must be a concrete number (it is compiled into the fused loss), not a traced value")
        check_positive("softcap", softcap)
        softcap = float(softcap)
    static_kwargs, traced = _hyper_parameters(divergence, temperature, beta, alpha)
    n = student_hidden.shape[0]
    dtype = jnp.promote_types(compute_dtype(student_hidden), compute_dtype(student_head))
    w = jax.lax.stop_gradient(example_weights((n,), mask, weights, dtype))
    static = (
        divergence,
        max(1, min(chunk_size, n)),
        jnp.dtype(student_hidden.dtype),
        jnp.dtype(student_head.dtype),
        tuple(sorted(static_kwargs.items())),
        softcap,
    )
    args = (traced, student_hidden, student_head, teacher_hidden, teacher_head, w)
    if reduction == "none":
        return _per_token(static, *args)
    total = _fused_sum(static, *args)
    if reduction == "sum":
        return total
    if normalizer is not None:
        denom = jnp.asarray(normalizer, dtype)
        if denom.ndim:
            raise ValueError(f"normalizer must be a scalar, got shape {denom.shape}")
    else:
        denom = jnp.sum(w)
    return jnp.where(denom != 0, total / jnp.where(denom != 0, denom, 1.0), 0.0)
