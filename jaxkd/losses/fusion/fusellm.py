"""FuseLLM: knowledge fusion of several language models into one target distribution per token.

Wan, Huang, Cai, Quan, Bi & Shi, "Knowledge Fusion of Large Language Models" (ICLR 2024); checked against
the official code, ``fanqiwan/FuseLLM`` (``FuseLLM/src/utils/others.py``: token alignment;
``forward_for_logits.py``: the per-sequence cross-entropy metric; ``data_collator.py`` and
``trainer.py``: the fused target and the loss).

Two parts:

* host-side data preparation (NumPy / Python, not jittable): :func:`fusellm_token_alignment` aligns two
  tokenizations of one text by dynamic time warping over the edit distance between token strings
  ("MinED"), and :func:`fusellm_align_logits` carries a source model's per-step logits onto the target
  model's positions and vocabulary ("hard" vocabulary alignment: exact token-string matches);
* jittable losses on aligned teachers that share the student's vocabulary:
  :func:`fusellm_fused_target` (the MinCE / AvgCE fusion) and :func:`fusellm`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.checks import (
    check_choice,
    check_in_range,
    check_int,
    check_label_values,
    check_same_logits,
    check_temperature,
)
from jaxkd.losses.core import (
    Array,
    Reduction,
    kl_from_log_probs,
    label_one_hot,
    log_softmax,
    masked_logsumexp,
    probs,
    reduce_loss,
    to_float,
    zero_where_masked,
)

__all__ = ["fusellm_align_logits", "fusellm_fused_target", "fusellm", "fusellm_token_alignment"]


# ----- host-side token alignment (data preparation) -----


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of one character, each cost 1)."""
    previous = np.arange(len(b) + 1)
    for i, ca in enumerate(a, start=1):
        current = np.empty_like(previous)
        current[0] = i
        for j, cb in enumerate(b, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb))
        previous = current
    return int(previous[-1])


def fusellm_token_alignment(
    base_tokens: Sequence[str],
    blending_tokens: Sequence[str],
    *,
    base_prefix: str = "",
    blending_prefix: str = "",
) -> list[list[int]]:
    """For each token of the base (student) tokenization, the blending (teacher) tokens aligned to it.

    FuseLLM's token alignment (``transform_step_logits`` and ``dtw`` in ``fanqiwan/FuseLLM``,
    ``FuseLLM/src/utils/others.py``): dynamic time warping between the two token sequences with the cost
    ``editdistance(blending_token − blending_prefix, base_token − base_prefix)`` (each tokenizer's
    word-start marker, e.g. ``"▁"`` for Llama or ``"Ġ"`` for GPT-NeoX, removed before comparing)::

        D[0, 0] = 0,  D[i, 0] = D[0, j] = ∞,
        D[i, j] = cost(i, j) + min(D[i−1, j], D[i, j−1], D[i−1, j−1])

    and the official traceback from the last pair to the first: at each step the cheapest of
    (diagonal, up, left) in that order of preference on ties. Every token is matched at least once.

    Args:
      base_tokens: the base model's token strings of one text.
      blending_tokens: the blending model's token strings of the same text.
      base_prefix, blending_prefix: the word-start markers to strip before comparing.

    Returns:
      ``alignment[i]``: the sorted blending token indices matched to base token ``i``.
    """
    base, blend = list(base_tokens), list(blending_tokens)
    if not base or not blend:
        raise ValueError(f"both tokenizations must be non-empty, got {len(base)} base and {len(blend)} blending tokens")
    n, m = len(blend), len(base)
    cost = np.array(
        [[_edit_distance(a.replace(blending_prefix, "") if blending_prefix else a,
                         b.replace(base_prefix, "") if base_prefix else b) for b in base] for a in blend],
        np.float64,
    )
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(n):
        for j in range(m):
            acc[i + 1, j + 1] = cost[i, j] + min(acc[i, j + 1], acc[i + 1, j], acc[i, j])
    acc = acc[1:, 1:]
    i, j = n - 1, m - 1
    base_to_blending: list[list[int]] = [[] for _ in range(m)]
    while i > 0 or j > 0:
        base_to_blending[j].append(i)
        options = (
            acc[i - 1, j - 1] if i > 0 and j > 0 else np.inf,
            acc[i - 1, j] if i > 0 else np.inf,
            acc[i, j - 1] if j > 0 else np.inf,
        )
        move = int(np.argmin(options))  # first minimum: diagonal, then up, then left
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    base_to_blending[0].append(0)
    return [sorted(matches) for matches in base_to_blending]


def fusellm_align_logits(
    base_tokens: Sequence[str],
    blending_tokens: Sequence[str],
    blending_logits,
    base_vocab: Mapping[str, int],
    blending_vocab: Sequence[str],
    *,
    base_prefix: str = "",
    blending_prefix: str = "",
    top_k: int | None = None,
) -> np.ndarray:
    """The blending model's per-step logits carried onto the base tokenization and vocabulary.

    FuseLLM's ``transform_step_logits`` with ``vocab_align_type="hard"`` (``fanqiwan/FuseLLM``): after
    :func:`fusellm_token_alignment`, a base position ``i`` matched to exactly one blending position ``j``
    whose token equals the base token (the blending word-start marker replaced by the base one) takes the
    blending logits of step ``j``, each blending vocabulary entry moved to the base entry with the same
    string (entries with no counterpart are dropped; when several blending entries land on one base entry,
    the largest logit is kept — the official code keeps the first in its descending top-k order, the
    same entry). Every other base position (a mismatched token, or one base token matched to several
    blending tokens) gets a one-hot distribution on the base token itself (logit 0 there, ``-inf``
    elsewhere; the official code stores logit 1.0 alone, the same softmax). The official special case
    for MPT's missing leading marker on the first token is not reproduced.

    Args:
      base_tokens, blending_tokens: the two tokenizations (strings) of one text.
      blending_logits: ``[len(blending_tokens), V_blending]`` per-step logits of the blending model.
      base_vocab: base token string -> id (every base token must be in it).
      blending_vocab: blending id -> token string (``len == V_blending``).
      base_prefix, blending_prefix: word-start markers (see :func:`fusellm_token_alignment`).
      top_k: keep only the blending model's ``top_k`` logits per step first (the official pipeline stores
        the top 10), or ``None`` for all.

    Returns:
      ``[len(base_tokens), V_base]`` float32 logits with ``-inf`` for entries the blending model does not
      cover; ``V_base = max(base_vocab.values()) + 1``.
    """
    logits = np.asarray(blending_logits, np.float32)
    if logits.ndim != 2 or logits.shape[0] != len(blending_tokens):
        raise ValueError(
            f"blending_logits must be [len(blending_tokens), V] = [{len(blending_tokens)}, V], got shape {logits.shape}"
        )
    if logits.shape[1] != len(blending_vocab):
        raise ValueError(
            f"blending_logits has {logits.shape[1]} vocabulary entries but blending_vocab lists {len(blending_vocab)}"
        )
    missing = [t for t in base_tokens if t not in base_vocab]
    if missing:
        raise ValueError(f"base tokens not in base_vocab: {missing[:5]}")
    if top_k is not None:
        top_k = check_int("top_k", top_k, low=1)
        if top_k < logits.shape[1]:
            keep = np.zeros_like(logits, bool)
            np.put_along_axis(keep, np.argsort(-logits, axis=-1, kind="stable")[:, :top_k], True, axis=-1)
            logits = np.where(keep, logits, -np.inf)
    vocab_size = max(base_vocab.values()) + 1
    # Blending id -> base id (or -1), with the word-start marker translated.
    def to_base(token: str) -> str:
        return token.replace(blending_prefix, base_prefix) if blending_prefix else token

    mapping = np.array([base_vocab.get(to_base(t), -1) for t in blending_vocab], np.int64)
    alignment = fusellm_token_alignment(
        base_tokens, blending_tokens, base_prefix=base_prefix, blending_prefix=blending_prefix
    )
    out = np.full((len(base_tokens), vocab_size), -np.inf, np.float32)
    for i, matches in enumerate(alignment):
        base_token = base_tokens[i]
        if len(matches) == 1 and to_base(blending_tokens[matches[0]]) == base_token:
            row, ok = logits[matches[0]], mapping >= 0
            np.maximum.at(out[i], mapping[ok], row[ok])
        else:
            out[i, base_vocab[base_token]] = 0.0
    return out


# ----- fusion of aligned teachers (jittable) -----


def _check_teachers(teacher_logits, targets, mask) -> None:
    t, y = np.shape(teacher_logits), np.shape(targets)
    if len(t) < 2:
        raise ValueError(f"teacher_logits must be [M, ..., V] (teachers stacked on a leading axis), got shape {t}")
    if t[0] < 1:
        raise ValueError("teacher_logits needs at least one teacher (M = 0)")
    if y != t[1:-1]:
        raise ValueError(f"targets must have shape teacher_logits.shape[1:-1] = {t[1:-1]}, got {y}")
    if mask is not None and np.shape(mask) != y:
        raise ValueError(f"mask must have the targets' shape {y}, got {np.shape(mask)}")
    check_label_values(targets, t[-1], where=mask, name="targets")


def _token_ce(log_p: Array, targets: Array) -> Array:
    """``−log p[target]`` per position (``+inf`` for an excluded target); NaN for a target outside the
    vocabulary."""
    one_hot, valid = label_one_hot(targets, log_p.shape[-1])
    ce = -jnp.sum(jnp.where(one_hot, log_p, 0.0), axis=-1)
    return jnp.where(valid, ce, jnp.nan)


def _sequence_ce(teacher_logits: Array, targets: Array, mask: Array | None) -> Array:
    """Each teacher's mean next-token cross-entropy over each sequence's valid positions, ``[M, B]``.

    FuseLLM's ``metric_ce`` (``forward_for_logits.py``): computed from the untempered full logits; the
    mean is over the last axis before the vocabulary (the positions). 0 for a sequence with no valid
    position.
    """
    ce = _token_ce(log_softmax(teacher_logits), targets[None])  # [M, ..., T]
    valid = jnp.ones(ce.shape[1:], bool) if mask is None else jnp.asarray(mask, bool)
    total = jnp.sum(jnp.where(valid[None], ce, 0.0), axis=-1)
    count = jnp.sum(valid, axis=-1)
    return total / jnp.maximum(count, 1)


def _teacher_log_probs(teacher_logits: Array, temperature: float, top_k: int | None) -> Array:
    z = to_float(teacher_logits)
    if top_k is not None and top_k < z.shape[-1]:
        # The official pipeline stores each teacher's top-k logits and softmaxes over them alone.
        _, idx = jax.lax.top_k(z, top_k)
        keep = jnp.any(idx[..., :, None] == jnp.arange(z.shape[-1]), axis=-2)
        z = jnp.where(keep, z, -jnp.inf)
    return log_softmax(z, temperature)


def fusellm_fused_target(
    teacher_logits: Array,
    targets: Array,
    mask: Array | None = None,
    *,
    rule: str = "min_ce",
    temperature: float = 1.0,
    top_k: int | None = None,
) -> Array:
    """FuseLLM's fused target: one distribution per token from ``M`` teachers, as log-probabilities.

    Wan et al., "Knowledge Fusion of Large Language Models" (ICLR 2024), the fusion functions MinCE and
    AvgCE, as the official code computes them (``fanqiwan/FuseLLM``, ``trainer.py``). With ``CE_m`` teacher ``m``'s
    mean next-token cross-entropy on the gold targets over the sequence's valid positions (computed at
    temperature 1 from the full logits, ``metric_ce`` in ``forward_for_logits.py``) and ``P_m =
    softmax(z_m / T)`` (over the teacher's ``top_k`` logits only when ``top_k`` is given, as the official
    pipeline stores the top 10):

    * ``rule="min_ce"`` (MinCE, the paper's best and the official recipe's ``distill_greater_as_gt``):
      per sequence, the distribution matrix of the teacher with the lowest ``CE_m``
      (``argmax exp(−CE_m)``; ties go to the first teacher).
    * ``rule="avg_ce"`` (AvgCE, ``distill_weighted_as_gt``): ``Σ_m w_m P_m`` with ``w = softmax_m(exp(−CE_m))``
      per sequence. The official code applies the softmax to the *rewards* ``exp(−CE_m)``, not to
      ``−CE_m``; so does this function (the paper's text only says "weighted by CE").

    Args:
      teacher_logits: ``[M, B, T, V]`` (any ``[M, ..., T, V]``), aligned to the targets (position ``t``
        scores ``targets[..., t]``) and sharing one vocabulary.
      targets: integer ``[B, T]``, the gold next tokens.
      mask: boolean ``[B, T]``, the valid positions (``None``: all); masked targets may hold anything.
      rule: ``"min_ce"`` or ``"avg_ce"``.
      temperature: ``T`` of the teachers' distributions (official default 1).
      top_k: restrict each teacher to its ``top_k`` logits, or ``None``.

    Returns:
      ``log P_fused`` of shape ``[B, T, V]`` (``-inf`` for zero-mass entries).
    """
    check_choice("rule", rule, ("min_ce", "avg_ce"))
    check_temperature("temperature", temperature)
    _check_teachers(teacher_logits, targets, mask)
    if top_k is not None:
        top_k = check_int("top_k", top_k, low=1)
        if top_k > np.shape(teacher_logits)[-1]:
            raise ValueError(f"top_k={top_k} is larger than the vocabulary ({np.shape(teacher_logits)[-1]} entries)")
    teacher_logits = to_float(teacher_logits)
    targets = jnp.asarray(targets)
    ce = _sequence_ce(teacher_logits, targets, mask)  # [M, ...]
    log_t = _teacher_log_probs(teacher_logits, temperature, top_k)  # [M, ..., T, V]
    if rule == "min_ce":
        best = jnp.argmin(ce, axis=0)  # first minimum
        expand = best[None, ..., None, None]
        return jnp.take_along_axis(log_t, jnp.broadcast_to(expand, (1,) + log_t.shape[1:]), axis=0)[0]
    reward = jnp.exp(-ce)  # the official "reward" 1 / exp(metric_ce)
    log_w = jax.nn.log_softmax(reward, axis=0)[..., None, None]
    return masked_logsumexp(log_t + log_w, axis=0)


def fusellm(
    student_logits: Array,
    teacher_logits: Array,
    targets: Array,
    *,
    lm_weight: float = 0.9,
    rule: str = "min_ce",
    divergence: str = "ce",
    temperature: float = 1.0,
    top_k: int | None = None,
    mask: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
    normalizer: Array | float | None = None,
) -> Array:
    """FuseLLM's training loss: ``λ·CE(gold) + (1 − λ)·D(P_fused, p_S)`` per token, reduced over tokens.

    Wan et al., "Knowledge Fusion of Large Language Models" (ICLR 2024): ``λ·L_CLM + (1 − λ)·L_Fusion``, as the
    official trainer computes it (``fanqiwan/FuseLLM``, ``DistillTrainer.compute_loss`` with
    ``*_as_gt_type="hard"``)::

        L = λ · (−log p_S(y_t)) + (1 − λ) · D(P_fused,t, p_S,t)
        D = −Σ_v P_fused(v) log p_S(v)              (divergence="ce", the official default)
          = KL(P_fused ‖ p_S)                        (divergence="kl")

    ``p_S = softmax(student_logits)`` (no temperature on the student, as in the official code);
    ``P_fused`` is :func:`fusellm_fused_target` (``rule``, ``temperature``, ``top_k``). The official recipe
    (its README) uses ``λ = 0.9`` (``lm_loss_weight``, whose config default is 1.0), MinCE and ``"ce"``.
    Both terms are averaged over the valid tokens (the official code averages each over its own mask;
    here one ``mask`` serves both).
    The ``"ce"`` form differs from ``"kl"`` by the fused target's entropy (same student gradient).

    Args:
      student_logits: ``[B, T, V]``, aligned (position ``t`` scores ``targets[:, t]``).
      teacher_logits: ``[M, B, T, V]``, the aligned teachers over the student's vocabulary.
      targets: integer ``[B, T]``.
      lm_weight: ``λ`` in ``[0, 1]``.
      rule, temperature, top_k: see :func:`fusellm_fused_target`.
      divergence: ``"ce"`` or ``"kl"``.
      mask: boolean ``[B, T]``: the valid positions, used for the teachers' sequence cross-entropies and
        the reduction.
      weights: optional float ``[B, T]`` weights for the reduction.
      reduction: ``"mean"`` (over valid tokens; 0 when none), ``"sum"`` or ``"none"`` (per token).
      normalizer: the mean's denominator instead of this batch's token count (the global count under
        gradient accumulation, :func:`jaxkd.batch.batch_normalizer`).
    """
    check_in_range("lm_weight", lm_weight, 0.0, 1.0)
    check_choice("divergence", divergence, ("ce", "kl"))
    if np.ndim(teacher_logits) != np.ndim(student_logits) + 1:
        raise ValueError(
            f"teacher_logits must stack the teachers as [M, ..., V] next to student_logits [..., V], got shapes "
            f"{np.shape(teacher_logits)} and {np.shape(student_logits)}"
        )
    check_same_logits(student_logits, jax.ShapeDtypeStruct(np.shape(teacher_logits)[1:], jnp.float32))
    log_target = fusellm_fused_target(
        teacher_logits, targets, mask, rule=rule, temperature=temperature, top_k=top_k
    )
    log_s = log_softmax(student_logits)
    gold = _token_ce(log_s, jnp.asarray(targets))
    if divergence == "ce":
        soft = -jnp.sum(probs(log_target) * zero_where_masked(log_s), axis=-1)
    else:
        soft = kl_from_log_probs(log_target, log_s)
    lam = jnp.asarray(lm_weight, gold.dtype)
    return reduce_loss(lam * gold + (1.0 - lam) * soft, mask=mask, weights=weights, reduction=reduction,
                       normalizer=normalizer)
