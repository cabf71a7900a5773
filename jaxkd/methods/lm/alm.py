"""ALM: cross-tokenizer distillation of language models by approximate likelihood matching.

Minixhofer, Vulić & Ponti, "Cross-Tokenizer Distillation via Approximate Likelihood Matching" (2025), as
``bminixhofer/tokenkit`` computes it (see :func:`jaxkd.losses.alm`).

The teacher and the student tokenize the same text differently, so their next-token distributions live
over different vocabularies and cannot be compared token by token. ALM compares *likelihoods of text*
instead: over each chunk of text whose two ends are token boundaries in both tokenizations, the teacher's
and the student's log-likelihoods (the sums of their target tokens' log-probabilities) are matched with a
binarised f-divergence. The batch carries both tokenizations of the same windows and the chunk ids of
their targets (:func:`jaxkd.data.text.cross_tokenizer.parallel_rows`, which computes them host-side with
:func:`jaxkd.losses.alm_chunk_alignment`). With a byte-level teacher every student token is a chunk.

Participants read their own tokenization: the student ``("student_tokens", "student_mask")`` and the
teacher ``("tokens", "mask")`` — as the models take ``{"tokens", "mask"}``, the student's input is
:data:`student_input` (or an :class:`lm_input` of other keys). The data term on the student's own tokens
is :func:`jaxkd.methods.lm_ce` pointed at them: ``lm_ce(tokens_key="student_tokens",
mask_key="student_mask") + alm()``.

Differences from tokenkit: its losses are combined by approximate gradient-magnitude balancing
(``multitask_aggregation_fn="approx_gradmag_preserve_mag"``); here, as for every jaxkd method, the terms
have fixed weights (``weight`` plays that role: for ``τ ≫ |ℓ|`` a chunk's gradient is
``∂D/∂ℓ_S ≈ (ℓ_S − ℓ_T)/(τ·|ℓ_S|)``, against ``−1`` for a token's cross-entropy, so at the official
``τ = 100`` a fixed weight must be large, or ``τ`` small, for the term to matter). Not implemented: the
debiasing chunk modes (``alm_mode``), the latent/hidden-state ALM terms and the "unbiased"/"space" chunks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.batch import MASK, TOKENS
from jaxkd import losses
from jaxkd.inference import map_rows
from jaxkd.participants import Participant
from jaxkd.checks import check_choice, check_int, check_positive
from jaxkd.losses.core import log_softmax, reduce_loss
from jaxkd.losses.lm.tokens import next_token_targets, shift_logits
from jaxkd.methods.base import LossInputs, Method, Needs, Weight, require, stateless_method
from jaxkd.methods.registry import register
from jaxkd.models.base import Outputs

__all__ = ["alm", "cache_teacher_log_probs", "lm_input", "student_input"]

_DIVERGENCES = ("binary_kl", "binary_ce", "reverse_binary_kl")
#: The batch entry with the per-example share of the global chunk count (see jaxkd.data.text.cross_tokenizer).
CHUNK_NORMALIZER_KEY = "alm_chunk_normalizer"


@dataclasses.dataclass(frozen=True)
class lm_input:  # noqa: N801 - used like a function
    """A participant input reading ``batch[tokens_key]``/``batch[mask_key]`` as a language model's
    ``{"tokens", "mask"}``: ``jaxkd.participants.student(model, input=lm_input("student_tokens",
    "student_mask"))``. Create one and reuse it (participants compare function inputs by identity, and
    states with equal participants share one compiled step)."""

    tokens_key: str
    mask_key: str

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {TOKENS: batch[self.tokens_key], MASK: batch[self.mask_key]}


#: The input of a student with its own tokenizer: ``{"tokens": batch["student_tokens"], "mask":
#: batch["student_mask"]}``.
student_input = lm_input("student_tokens", "student_mask")


def target_log_probs(logits: jax.Array, tokens: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``log p(tokens[:, t + 1] | tokens[:, ≤ t])``, ``[B, T, V] -> [B, T − 1]`` (float32 at least).

    Position ``t``'s logits score token ``t + 1`` (:func:`jaxkd.losses.next_token_targets`); entries
    without a target (padding) are 0, so they stay finite whatever the logits there.
    """
    targets, target_mask = next_token_targets(tokens, mask)
    log_p = log_softmax(shift_logits(logits))
    picked = jnp.take_along_axis(log_p, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.where(target_mask, picked, 0.0)


@register(
    "alm", inputs="two_tokenizations",
    paper="Minixhofer, Vulić & Ponti, *Cross-Tokenizer Distillation via Approximate Likelihood Matching*, 2025",
    losses=("alm", "alm_chunk_alignment"),
)
def alm(
    *,
    temperature: float = 100.0,
    divergence: str = "binary_kl",
    epsilon: float = 1e-6,
    student_tokens_key: str = "student_tokens",
    student_mask_key: str = "student_mask",
    teacher_tokens_key: str = TOKENS,
    teacher_mask_key: str = MASK,
    teacher_chunks_key: str = "alm_teacher_chunks",
    student_chunks_key: str = "alm_student_chunks",
    chunk_mask_key: str = "alm_chunk_mask",
    cached: bool = False,
    teacher_log_probs_key: str = "alm_teacher_log_probs",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "alm",
) -> Method:
    """Approximate likelihood matching between a teacher and a student with different tokenizers.

    With ``log p_S(s_j | s_<j)`` the student's log-probability of its target token ``j`` and ``log p_T`` the
    teacher's of its own, per chunk ``c`` of aligned text (``ℓ(c) = Σ_{j∈c} log p(token j)`` on each side)::

        L = mean_c  D_τ( ℓ_T(c), ℓ_S(c) )

    :func:`jaxkd.losses.alm` (the binarised divergence at temperature ``τ``, tokenkit's
    ``compute_alm_loss``, its ``alm_unconstrained`` chunks). The mean is over the chunks of the whole batch:
    divided by the batch's global chunk count (``batch["alm_chunk_normalizer"]``, see
    :class:`jaxkd.data.text.cross_tokenizer.ParallelBatches`) when it carries one, so it is exact under gradient
    accumulation; else over the chunks of this (micro-)batch. The teacher's side is gradient-stopped.
    Both models' log-probabilities are ``log_softmax`` of their shifted logits gathered at the next token.

    The teacher's side needs only the log-probability of each of its target tokens: ``cached=True`` reads
    it from ``batch[teacher_log_probs_key]`` (float ``[B, Tt − 1]``, :func:`cache_teacher_log_probs` of the
    frozen teacher over the rows, computed once) and runs no teacher in the step: the same loss as the live
    teacher (tested; the teacher's side is a constant either way), at the cost of a student-only step.

    The participants must be configured to read their own tokenization (the student
    ``batch[student_tokens_key]``, e.g. with :data:`student_input`; the teacher ``batch[teacher_tokens_key]``):
    a participant whose logits are not as long as its tokens is refused. ``cross_vocabulary=True``:
    :func:`jaxkd.create` then accepts a teacher with another vocabulary size than the student's.

    Args:
      temperature: the binarisation temperature ``τ > 0`` (tokenkit's ``binarization_temp``, default 100).
      divergence: ``"binary_kl"`` (the paper's), ``"binary_ce"`` (tokenkit's default; same student gradient)
        or ``"reverse_binary_kl"``.
      epsilon: ``ε > 0`` of :func:`jaxkd.losses.alm`.
      student_tokens_key, student_mask_key, teacher_tokens_key, teacher_mask_key: the two tokenizations.
      teacher_chunks_key, student_chunks_key, chunk_mask_key: the chunk ids of the targets (``[B, Tt − 1]``,
        ``[B, Ts − 1]``) and the chunk slots (``[B, C]``).
      cached: read the teacher's target log-probabilities from the batch instead of running the teacher.
      teacher_log_probs_key: where ``cached=True`` reads them.
      teacher: the participant distilled from (live).

    Metrics: ``chunks`` (chunks in the batch), ``teacher_chunk_nll``/``student_chunk_nll`` (mean negative
    log-likelihood of a chunk, nats).
    """
    check_positive("temperature", temperature)
    check_positive("epsilon", epsilon)
    check_choice("divergence", divergence, _DIVERGENCES)

    def side(inputs: LossInputs, outputs: Outputs, participant: str, tokens_key: str, mask_key: str) -> jax.Array:
        tokens = require(inputs.batch, tokens_key, method=name)
        logits = outputs.logits
        if logits.ndim != 3 or logits.shape[:2] != tokens.shape:
            raise ValueError(
                f"{name!r}: participant {participant!r} gives logits of shape {logits.shape}, but its tokens "
                f"batch[{tokens_key!r}] have shape {tokens.shape}: it must read its own tokenization (e.g. "
                f"input=jaxkd.methods.lm_input({tokens_key!r}, {mask_key!r}))")
        return target_log_probs(logits, tokens, inputs.batch.get(mask_key))

    def compute(inputs: LossInputs, rng):
        student_lp = side(inputs, inputs.output("student", method=name), "student", student_tokens_key,
                          student_mask_key)
        s_ids = require(inputs.batch, student_chunks_key, method=name)
        t_ids = require(inputs.batch, teacher_chunks_key, method=name)
        if cached:
            teacher_lp = jnp.asarray(require(inputs.batch, teacher_log_probs_key, method=name))
            if teacher_lp.shape != t_ids.shape:
                raise ValueError(f"{name!r}: batch[{teacher_log_probs_key!r}] must hold one log-probability per "
                                 f"teacher target, shape {t_ids.shape}, got {teacher_lp.shape}")
            teacher_lp = jax.lax.stop_gradient(teacher_lp)
        else:
            teacher_lp = side(inputs, inputs.target(teacher, method=name), teacher, teacher_tokens_key,
                              teacher_mask_key)
        chunk_mask = jnp.asarray(require(inputs.batch, chunk_mask_key, method=name), bool)
        per_chunk = losses.alm(student_lp, teacher_lp, s_ids, t_ids, chunk_mask, temperature=temperature,
                                    divergence=divergence, epsilon=epsilon, reduction="none")
        share = inputs.batch.get(CHUNK_NORMALIZER_KEY)
        normalizer = None if share is None else jnp.sum(jnp.asarray(share, jnp.float32))
        value = reduce_loss(per_chunk, mask=chunk_mask, normalizer=normalizer)
        count = jnp.sum(chunk_mask).astype(jnp.float32)
        nll = lambda lp, ids: -jnp.sum(  # noqa: E731
            jnp.where(chunk_mask, losses.alm_chunk_log_likelihoods(lp, ids, chunk_mask.shape[1]), 0.0)
        ) / jnp.maximum(count, 1.0)
        return value, {"chunks": count, "teacher_chunk_nll": nll(teacher_lp, t_ids),
                       "student_chunk_nll": jax.lax.stop_gradient(nll(student_lp, s_ids))}

    teacher_keys = (teacher_log_probs_key,) if cached else (teacher_tokens_key, teacher_mask_key)
    method = stateless_method(
        name, compute, weight=weight, participants=() if cached else (teacher,),
        batch_keys=(student_tokens_key, student_mask_key, *teacher_keys, teacher_chunks_key, student_chunks_key,
                    chunk_mask_key),
        needs=Needs(cross_vocabulary=True))
    return method


def cache_teacher_log_probs(model, variables, tokens, mask, *, batch_size: int = 32) -> np.ndarray:
    """A frozen teacher's target log-probabilities of every row, for ``alm(cached=True)`` (host, once).

    :func:`target_log_probs` of ``model.apply(variables, {"tokens", "mask"}, train=False)`` over ``tokens`` /
    ``mask`` (``[N, T]``) in batches of ``batch_size`` rows (the last one padded with masked rows, so one
    compilation): float32 ``[N, T − 1]``, 0 where there is no target.
    """
    check_int("batch_size", batch_size, low=1)
    tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
    if tokens.ndim != 2 or mask.shape != tokens.shape:
        raise ValueError(f"tokens and mask must both be [N, T], got shapes {tokens.shape} and {mask.shape}")

    def run(outputs, batch):
        return target_log_probs(outputs.logits, batch[TOKENS], batch[MASK])

    teacher = Participant(model, variables, trains=False, input=(TOKENS, MASK))
    return map_rows(teacher, {TOKENS: tokens, MASK: mask}, run, batch_size=batch_size, name="teacher").astype(
        np.float32)
