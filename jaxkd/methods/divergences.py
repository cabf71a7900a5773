"""Method transforms for the logit divergences of :mod:`jaxkd.losses.divergences` and :mod:`jaxkd.losses.sparse`.

Every factory returns a :class:`~jaxkd.methods.base.Method` whose loss compares ``inputs.student.logits``
with the detached teacher logits (``jax.lax.stop_gradient``), averaged over the examples that
``batch["mask"]`` keeps.

**No ``T²`` factor** is applied by any of these methods (TRL's GKD and DistiLLM use none; only Hinton KD,
:func:`jaxkd.methods.kd`, does). To get Hinton's gradient scale at a temperature ``T``, pass
``weight=T**2``.
"""

from __future__ import annotations

import math
from typing import Callable

import jax

from jaxkd.losses import divergences as D
from jaxkd.losses import sparse as S
from jaxkd.losses._core import check_in_range, check_positive
from jaxkd.methods.base import (
    LossAux,
    LossInputs,
    Method,
    MethodVars,
    Weight,
    example_mask,
    require,
    require_teacher,
)


def _logit_method(name: str, weight: Weight, fn: Callable[..., jax.Array]) -> Method:
    """A teacher method computing ``fn(student_logits, stop_gradient(teacher_logits), mask=...)``."""

    def loss(vars: MethodVars, inputs: LossInputs, rng: jax.Array):
        del rng
        teacher = require_teacher(inputs, method=name)
        value = fn(
            inputs.student.logits,
            jax.lax.stop_gradient(teacher.logits),
            mask=example_mask(inputs.batch),
        )
        return value, LossAux({}, vars.state)

    return Method(name=name, loss=loss, weight=weight, needs_teacher=True)


def forward_kl(*, temperature: float = 1.0, weight: Weight = 1.0, name: str = "fkl") -> Method:
    """Forward KL ``KL(p_T ‖ p_S)`` at temperature ``T``, without ``T²`` (:func:`jaxkd.losses.forward_kl`).

    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015); GKD's ``β = 0``
    (Agarwal et al., ICLR 2024). Registry name ``"fkl"``.
    """
    check_positive("temperature", temperature)
    return _logit_method(name, weight, lambda s, t, mask: D.forward_kl(s, t, temperature=temperature, mask=mask))


def reverse_kl(*, temperature: float = 1.0, weight: Weight = 1.0, name: str = "rkl") -> Method:
    """Reverse KL ``KL(p_S ‖ p_T)``, without ``T²`` (:func:`jaxkd.losses.reverse_kl`).

    Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models" (ICLR 2024), as the exact
    token-level divergence (not MiniLLM's sequence-level policy gradient). Registry name ``"rkl"``.
    """
    check_positive("temperature", temperature)
    return _logit_method(name, weight, lambda s, t, mask: D.reverse_kl(s, t, temperature=temperature, mask=mask))


def jsd(*, temperature: float = 1.0, weight: Weight = 1.0, name: str = "jsd") -> Method:
    """Jensen–Shannon divergence ``½KL(p_T‖m) + ½KL(p_S‖m)``, ``m = ½(p_T + p_S)``, without ``T²``.

    Lin, "Divergence Measures Based on the Shannon Entropy" (1991) (:func:`jaxkd.losses.js_divergence`).
    Registry name ``"jsd"``.
    """
    check_positive("temperature", temperature)
    return _logit_method(name, weight, lambda s, t, mask: D.js_divergence(s, t, temperature=temperature, mask=mask))


def gjsd(*, beta: float = 0.5, temperature: float = 1.0, weight: Weight = 1.0, name: str = "gjsd") -> Method:
    """GKD's generalized JSD in TRL's convention, without ``T²`` (:func:`jaxkd.losses.generalized_jsd`).

    Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"
    (ICLR 2024): ``m = β p_T + (1−β) p_S``, ``β KL(p_T‖m) + (1−β) KL(p_S‖m)``; ``β = 0`` is forward KL,
    ``β = 1`` reverse KL (TRL's special cases). This is the loss only: GKD's on-policy student sampling
    (``λ``) is not part of it. Registry name ``"gjsd"``.
    """
    check_in_range("beta", beta, 0.0, 1.0)
    check_positive("temperature", temperature)
    return _logit_method(
        name, weight, lambda s, t, mask: D.generalized_jsd(s, t, temperature=temperature, beta=beta, mask=mask)
    )


def skl(*, alpha: float = 0.1, temperature: float = 1.0, weight: Weight = 1.0, name: str = "skl") -> Method:
    """DistiLLM skew KL ``KL(p_T ‖ α p_T + (1−α) p_S)``, without ``T²`` (:func:`jaxkd.losses.skew_kl`).

    Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models" (ICML 2024), default
    ``α = 0.1`` as in its code. The KL form: it differs from DistiLLM's cross-entropy by the constant
    ``H(p_T)``, with the same student gradients. DistiLLM's adaptive off-policy sampling is not part of
    it. Registry name ``"skl"``.
    """
    check_in_range("alpha", alpha, 0.0, 1.0)
    check_positive("temperature", temperature)
    return _logit_method(
        name, weight, lambda s, t, mask: D.skew_kl(s, t, temperature=temperature, alpha=alpha, mask=mask)
    )


def srkl(*, alpha: float = 0.1, temperature: float = 1.0, weight: Weight = 1.0, name: str = "srkl") -> Method:
    """DistiLLM skew reverse KL ``KL(p_S ‖ (1−α) p_T + α p_S)``, without ``T²``; see
    :func:`jaxkd.losses.skew_reverse_kl`.

    Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models" (ICML 2024), default
    ``α = 0.1``. Registry name ``"srkl"``.
    """
    check_in_range("alpha", alpha, 0.0, 1.0)
    check_positive("temperature", temperature)
    return _logit_method(
        name, weight, lambda s, t, mask: D.skew_reverse_kl(s, t, temperature=temperature, alpha=alpha, mask=mask)
    )


def tvd(*, temperature: float = 1.0, weight: Weight = 1.0, name: str = "tvd") -> Method:
    """Total variation distance ``½ Σ |p_T − p_S|`` at temperature ``T``, no ``T²``; see
    :func:`jaxkd.losses.total_variation`.

    Wen et al., "f-Divergence Minimization for Sequence-Level Knowledge Distillation" (ACL 2023) use TVD
    among their f-divergences; DistiLLM ships it as a baseline. Registry name ``"tvd"``.
    """
    check_positive("temperature", temperature)
    return _logit_method(
        name, weight, lambda s, t, mask: D.total_variation(s, t, temperature=temperature, mask=mask)
    )


def ab(*, alpha: float, beta: float, temperature: float = 1.0, weight: Weight = 1.0, name: str = "ab") -> Method:
    """Alpha-Beta divergence ``D_AB^(α,β)(p_T ‖ p_S)``, no ``T²`` (:func:`jaxkd.losses.alpha_beta_divergence`).

    Cichocki, Cruces & Amari, "Generalized Alpha-Beta Divergences and Their Application to Robust
    Nonnegative Matrix Factorization" (Entropy, 2011), with teacher ``P`` and student ``Q``; ``α = 1,
    β = 0`` is forward KL, ``α = 0, β = 1`` reverse KL. Registry name ``"ab"``.
    """
    for arg, value in (("alpha", alpha), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{arg} must be a finite number, got {arg}={value!r}")
    check_positive("temperature", temperature)
    return _logit_method(
        name,
        weight,
        lambda s, t, mask: D.alpha_beta_divergence(s, t, temperature=temperature, alpha=alpha, beta=beta, mask=mask),
    )


def sparse_kd(
    *,
    k: int | None = None,
    tail: str = "drop",
    temperature: float = 1.0,
    weight: Weight = 1.0,
    name: str = "sparse_kd",
    indices_key: str | None = None,
    log_probs_key: str | None = None,
) -> Method:
    """Forward KL against the teacher's top-``k`` distribution, no ``T²`` (:func:`jaxkd.losses.sparse_forward_kl`).

    Online (default): the top-``k`` classes of the teacher's logits at temperature ``T``
    (:func:`jaxkd.losses.topk_teacher`). Offline: with ``indices_key`` and ``log_probs_key``, the stored
    ``batch[indices_key]`` / ``batch[log_probs_key]`` (``[..., k_stored]``, full-vocabulary teacher
    log-probabilities computed at the same ``T``, sorted by decreasing probability as
    :func:`~jaxkd.losses.topk_teacher` returns them); then no teacher is needed, and ``k`` (if given) keeps
    the first ``k`` stored entries. ``tail`` is ``"drop"`` (renormalize both over the top-k set) or
    ``"bucket"`` (one extra tail category), as in DistillKit's sparse KL. Registry name ``"sparse_kd"``.
    """
    check_positive("temperature", temperature)
    if tail not in ("drop", "bucket"):
        raise ValueError(f"tail must be 'drop' or 'bucket', got tail={tail!r}")
    if (indices_key is None) != (log_probs_key is None):
        raise ValueError("sparse_kd needs both indices_key and log_probs_key (offline top-k) or neither (online)")
    offline = indices_key is not None
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive integer, got k={k!r}")
    if not offline and k is None:
        raise ValueError("sparse_kd needs k (the number of teacher classes to keep) unless it reads stored top-k")

    def loss(vars: MethodVars, inputs: LossInputs, rng: jax.Array):
        del rng
        if offline:
            indices = require(inputs.batch, indices_key, method=name)
            log_probs = require(inputs.batch, log_probs_key, method=name)
            if k is not None:
                stored = indices.shape[-1]
                if k > stored:
                    raise ValueError(
                        f"k={k} is larger than the {stored} stored top-k entries in batch[{indices_key!r}]"
                    )
                indices, log_probs = indices[..., :k], log_probs[..., :k]
            log_probs = jax.lax.stop_gradient(log_probs)
        else:
            teacher = require_teacher(inputs, method=name)
            indices, log_probs = S.topk_teacher(jax.lax.stop_gradient(teacher.logits), k, temperature=temperature)
        value = S.sparse_forward_kl(
            inputs.student.logits,
            indices,
            log_probs,
            temperature=temperature,
            tail=tail,
            mask=example_mask(inputs.batch),
        )
        return value, LossAux({}, vars.state)

    return Method(
        name=name,
        loss=loss,
        weight=weight,
        batch_keys=(indices_key, log_probs_key) if offline else (),
        needs_teacher=not offline,
    )
