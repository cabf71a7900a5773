"""DAC-KL (MGSR) as a method: clipped distribution-adaptive KL plus span-level correlation on word spans."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd.batch import TOKENS
from jaxkd import losses
from jaxkd.checks import check_in_range, check_nonnegative
from jaxkd.losses.lm.tokens import shift_logits
from jaxkd.methods.base import LossInputs, Method, Weight, check_roles, stateless_method
from jaxkd.methods.registry import LOGIT_ROLES, register
from jaxkd.methods.lm.tokens import LM_KEYS, lm_targets

__all__ = ["dac_kl", "identifier_spans"]


def identifier_spans(tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Span ids of byte tokens: maximal runs of identifier bytes (``[A-Za-z0-9_]``) — the word-level
    spans of source code, standing in for MGSR's phrase chunker — numbered per row; ``-1`` elsewhere."""
    t = tokens
    ident = ((t >= ord("a")) & (t <= ord("z"))) | ((t >= ord("A")) & (t <= ord("Z"))) | \
            ((t >= ord("0")) & (t <= ord("9"))) | (t == ord("_"))
    ident = ident & mask
    starts = ident & ~jnp.pad(ident[:, :-1], ((0, 0), (1, 0)))
    return jnp.where(ident, jnp.cumsum(starts, axis=1) - 1, -1)


@register(
    "dac_kl", inputs="tokens",
    paper="Liu et al., *Multi-Granularity Semantic Revision for Large Language Model Distillation*, 2024",
    losses=("dac_kl", "span_correlation_loss"),
    status="assumed form: the paper's Eq. 6/10 and code are unreachable (fixed quantile clipping; see the loss)",
    contract=LOGIT_ROLES,
)
def dac_kl(
    *,
    lower: float = 0.0,
    upper: float = 0.99,
    span_weight: float = 1.0,
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "dac_kl",
) -> Method:
    """MGSR's token and span terms, in the forms :mod:`jaxkd.losses.lm.dac_kl` assumes: the forward KL on the
    teacher's distribution clipped to its ``[lower, upper]`` probability quantiles (fixed bounds, not the
    learned sub-network), plus ``span_weight`` × the span-level correlation loss over identifier spans of
    byte tokens (:func:`identifier_spans`). Combine with ``lm_ce`` (the paper's SFT term).
    Metrics: ``span``. ``student``/``teacher`` name the participants in the two roles, as in
    :func:`~jaxkd.methods.token_kd` (the teacher's logits are a gradient-stopped target)."""
    check_roles(name, student, teacher)
    check_in_range("lower", lower, 0.0, 1.0)
    check_in_range("upper", upper, lower, 1.0)
    check_nonnegative("span_weight", span_weight)

    def compute(inputs: LossInputs, rng):
        _, target_mask, normalizer = lm_targets(inputs.batch)
        s = shift_logits(inputs.output(student, method=name).logits)
        t = shift_logits(inputs.target(teacher, method=name).logits)
        token_term = losses.dac_kl(s, t, lower=lower, upper=upper, mask=target_mask, normalizer=normalizer)
        spans = identifier_spans(inputs.batch[TOKENS][:, 1:], target_mask)  # the spans of the targets
        span_term = losses.span_correlation_loss(s, t, spans, target_mask)
        return token_term + span_weight * span_term, {"span": span_term}

    return stateless_method(name, compute, weight=weight, participants=(student, teacher),
                            trained=(student,), batch_keys=LM_KEYS)
