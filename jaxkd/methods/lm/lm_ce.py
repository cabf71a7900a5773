"""Next-token cross-entropy as a method: the data term of language-model distillation."""

from __future__ import annotations

import jax

from jaxkd import losses
from jaxkd.checks import check_in_range
from jaxkd.batch import MASK, TOKENS, batch_normalizer, batch_target_mask, normalizer_key_of
from jaxkd.losses.lm.tokens import next_token_targets
from jaxkd.methods.base import LossInputs, Method, Weight, stateless_method
from jaxkd.methods.lm.tokens import full_length_mask
from jaxkd.methods.registry import register

__all__ = ["lm_ce"]


@register("lm_ce", inputs="tokens", paper="next-token cross-entropy (the data term of LM distillation)", losses=("cross_entropy",))
def lm_ce(*, label_smoothing: float = 0.0, tokens_key: str = TOKENS, mask_key: str = MASK,
          normalizer_key: str | None = None, participant: str = "student", weight: Weight = 1.0,
          name: str = "lm_ce") -> Method:
    """The next-token cross-entropy of ``participant`` (the student) on the batch: ``−log p(x_{t+1} | x_≤t)``
    averaged over the target tokens (:func:`jaxkd.losses.cross_entropy` per token, shifted).
    ``tokens_key``/``mask_key`` name the batch entries the participant reads (a student with its own
    tokenizer reads e.g. ``"student_tokens"``); ``normalizer_key`` the global target count of that
    tokenization (default :func:`jaxkd.batch.normalizer_key_of` ``(tokens_key)``: ``"token_normalizer"``,
    ``"student_token_normalizer"``...; when the batch lacks it the mean is over the (micro-)batch's own
    targets). Targets crossing a packed document boundary (``"segment_ids"``) and prompt targets
    (``"loss_mask"``, completion-only loss) do not count (:func:`jaxkd.batch.batch_target_mask`).
    Registry ``"lm_ce"``."""
    check_in_range("label_smoothing", label_smoothing, 0.0, 1.0)
    count_key = normalizer_key_of(tokens_key) if normalizer_key is None else normalizer_key

    def compute(inputs: LossInputs, rng):
        targets, target_mask = next_token_targets(inputs.batch[tokens_key], inputs.batch.get(mask_key))
        # Packed documents' boundaries and prompt tokens (segment_ids / loss_mask, when the batch has them).
        target_mask = target_mask & batch_target_mask(inputs.batch, tokens_key, mask_key)
        # Each tokenization has its own global count (a second tokenization holds other tokens).
        normalizer = batch_normalizer(inputs.batch, count_key)
        logits = inputs.output(participant, method=name).logits
        # The whole [B, T, V] logits, the last position masked (full_length_mask): no sliced copy.
        targets = jax.numpy.pad(targets, ((0, 0), (0, 1)))
        return losses.cross_entropy(logits, targets, label_smoothing=label_smoothing,
                                    mask=full_length_mask(target_mask), normalizer=normalizer)

    return stateless_method(name, compute, weight=weight,
                            participants=() if participant == "student" else (participant,),
                            batch_keys=(tokens_key, mask_key))
