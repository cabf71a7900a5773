"""ULD as a method: cross-tokenizer distillation of language models by sorted-probability L1 (and GOLD's hybrid).

Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs" (2024),
with the byte-offset alignment and the hybrid loss of TRL's GOLD (``trl/experimental/gold/gold_trainer.py``,
``ULDLoss``); see :func:`jaxkd.losses.uld`.

It reads the batches ALM reads (:func:`jaxkd.data.text.cross_tokenizer.parallel_rows`: both tokenizations of
the same windows and the chunk ids of their targets, ``alm_student_chunks``/``alm_teacher_chunks``/
``alm_chunk_mask``). On those rows — windows that tile the text and end at a common boundary — ALM's chunks are
exactly GOLD's groups (:func:`jaxkd.losses.uld_alignment`; tested), so one batch serves ``alm() + uld()``; for
chat/completion rows with other spans (zero-width specials, a trailing unfinished group), write the groups of
:func:`jaxkd.losses.uld_alignment` under other keys and name them here (or the original ULD's
position-by-position pairs, :func:`jaxkd.losses.uld_positional_alignment`, for tokenizers without byte
offsets). Participants read their own tokenization, as for ALM (the student ``("student_tokens",
"student_mask")``: :data:`jaxkd.methods.student_input`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import losses
from jaxkd.batch import TOKENS
from jaxkd.checks import check_choice, check_in_range, check_positive
from jaxkd.methods.base import LossInputs, Method, Needs, Weight, require, stateless_method
from jaxkd.methods.registry import register

__all__ = ["uld"]


@register(
    "uld", inputs="two_tokenizations",
    paper="Boizard et al., *Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs*, "
          "2024 (and TRL GOLD's hybrid ULD)",
    losses=("uld", "uld_alignment", "uld_positional_alignment", "uld_matched_vocabulary"),
)
def uld(
    *,
    merge: str = "bayesian",
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    matched_vocabulary: tuple[np.ndarray, np.ndarray] | None = None,
    beta: float = 0.5,
    matched_weight: float | None = None,
    unmatched_weight: float | None = None,
    student_tokens_key: str = "student_tokens",
    teacher_tokens_key: str = TOKENS,
    student_groups_key: str = "alm_student_chunks",
    teacher_groups_key: str = "alm_teacher_chunks",
    group_mask_key: str = "alm_chunk_mask",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "uld",
) -> Method:
    """Universal Logit Distillation between a teacher and a student with different tokenizers.

    Per group ``g`` of aligned targets (the tokens of both tokenizations between two common byte boundaries),
    each side's distribution ``P_g`` is its next-token distribution merged over the group by the chain rule
    (``"bayesian"``: the last target's distribution times the probabilities of the group's earlier targets), and
    ::

        L = mean_sequences  mean_{g ∈ sequence}  Σ_v | sort↓(P^S_g)_v − sort↓(P^T_g)_v |

    (the vectors padded with zeros to the larger vocabulary), or with ``matched_vocabulary`` GOLD's hybrid:
    generalized JSD (``beta``) on the vocabulary entries both tokenizers share, sorted L1 on the others
    (:func:`jaxkd.losses.uld`; equal to TRL's ``ULDLoss``, tested). The teacher's side is gradient-stopped.
    ``merge="observed"`` is TRL's default: the distribution read at each target is the one at the target's own
    position (``logits[:, 1:]``), which predicts the following token; ``"bayesian"`` (default here) reads
    the one that predicts it (``logits[:, :-1]``).

    Args:
      merge: ``"bayesian"`` or ``"observed"`` (TRL's ``uld_token_merge_strategy``).
      student_temperature, teacher_temperature: softmax temperatures (TRL's ``uld_*_temperature``).
      matched_vocabulary: ``(student_ids, teacher_ids)`` of the shared vocabulary
        (:func:`jaxkd.losses.uld_matched_vocabulary`): the hybrid loss (TRL's ``uld_use_hybrid_loss``).
      beta, matched_weight, unmatched_weight: the hybrid's JSD ``β`` and fixed weights (``None``: ``M/V_T``
        and ``1 − M/V_T``).
      student_tokens_key, teacher_tokens_key: the two tokenizations (masks are implied by the groups).
      student_groups_key, teacher_groups_key, group_mask_key: the group of each target (``[B, Ts − 1]``,
        ``[B, Tt − 1]``; ``-1``: none) and the group slots (``[B, G]``); by default ALM's chunk entries.
      teacher: the participant distilled from.

    The mean is over the (micro-)batch's sequences, as TRL's (``torch.stack(losses).mean()``), a row without
    groups counting 0. Metrics: ``groups`` (groups in the batch).
    """
    check_choice("merge", merge, ("bayesian", "observed"))
    check_positive("student_temperature", student_temperature)
    check_positive("teacher_temperature", teacher_temperature)
    check_in_range("beta", beta, 0.0, 1.0)
    if (matched_weight is None) != (unmatched_weight is None):
        raise ValueError(f"{name}: matched_weight and unmatched_weight are set together (both or neither), got "
                         f"{matched_weight} and {unmatched_weight}")
    if matched_vocabulary is not None:
        matched_vocabulary = tuple(np.asarray(ids, np.int32) for ids in matched_vocabulary)

    def side(inputs: LossInputs, logits: jax.Array, participant: str, tokens_key: str):
        tokens = require(inputs.batch, tokens_key, method=name)
        if logits.ndim != 3 or logits.shape[:2] != tokens.shape:
            raise ValueError(
                f"{name!r}: participant {participant!r} gives logits of shape {logits.shape}, but its tokens "
                f"batch[{tokens_key!r}] have shape {tokens.shape}: it must read its own tokenization (e.g. "
                f"input=jaxkd.methods.lm_input({tokens_key!r}, ...))")
        # Position t's distribution and the target it reads (see jaxkd.losses.uld on the two merges).
        return (logits[:, :-1] if merge == "bayesian" else logits[:, 1:]), tokens[:, 1:]

    def compute(inputs: LossInputs, rng):
        zs, ys = side(inputs, inputs.output("student", method=name).logits, "student", student_tokens_key)
        zt, yt = side(inputs, jax.lax.stop_gradient(inputs.target(teacher, method=name).logits), teacher,
                      teacher_tokens_key)
        group_mask = jnp.asarray(require(inputs.batch, group_mask_key, method=name), bool)
        value = losses.uld(
            zs, zt, ys, yt, require(inputs.batch, student_groups_key, method=name),
            require(inputs.batch, teacher_groups_key, method=name), group_mask, merge=merge,
            student_temperature=student_temperature, teacher_temperature=teacher_temperature,
            matched_vocabulary=matched_vocabulary, beta=beta, matched_weight=matched_weight,
            unmatched_weight=unmatched_weight)
        return value, {"groups": jnp.sum(group_mask).astype(jnp.float32)}

    return stateless_method(
        name, compute, weight=weight, participants=(teacher,),
        batch_keys=(student_tokens_key, teacher_tokens_key, student_groups_key, teacher_groups_key, group_mask_key),
        needs=Needs(cross_vocabulary=True))
