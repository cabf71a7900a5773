"""Label cross-entropy as a method: the data term of supervised training and of most distillation recipes."""

from __future__ import annotations

import jax.numpy as jnp

from jaxkd import losses
from jaxkd.batch import MIX_LAMBDA, MIX_PARTNER
from jaxkd.checks import check_in_range
from jaxkd.losses.core import combine_masks, reduce_loss
from jaxkd.methods.base import LossInputs, Method, Weight, stateless_method
from jaxkd.methods.registry import register

__all__ = ["ce"]


def _mixed_cross_entropy(logits, inputs: LossInputs, name: str, label_smoothing: float):
    """``λ_i·CE(z_i, y_i) + (1 − λ_i)·CE(z_i, y_partner[i])`` over the examples whose own label and partner's
    label are both known (a mixup or CutMix batch: :mod:`jaxkd.methods.augment`). With label smoothing each
    term is smoothed, which is the cross-entropy with the mixed smoothed target (CE is linear in the target)."""
    labels = inputs.labels(name)
    partner, lam = inputs.batch[MIX_PARTNER], inputs.batch[MIX_LAMBDA]
    own = losses.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="none")
    other = losses.cross_entropy(logits, labels[partner], label_smoothing=label_smoothing, reduction="none")
    per_example = lam * own + (1.0 - lam) * jnp.where(lam < 1.0, other, 0.0)  # an unmixed row: its own CE only
    mask = inputs.label_mask
    if inputs.labeled is not None:  # a partner without a label leaves its share of the target unknown
        mask = combine_masks(mask, inputs.labeled[partner] | (lam >= 1.0))
    return reduce_loss(per_example, mask=mask)


@register("ce", paper="Szegedy et al., *Rethinking the Inception Architecture* (label smoothing), 2016",
          losses=("cross_entropy",))
def ce(
    *, label_smoothing: float = 0.0, participant: str = "student", weight: Weight = 1.0, name: str = "ce"
) -> Method:
    """Cross-entropy of a participant's logits (the student's by default; ``participant="peer"`` for a
    trained peer or an online teacher) with the labels (:func:`jaxkd.losses.cross_entropy`), over the
    labeled examples of the batch.

    On a mixed batch (``mixup``/``cutmix`` in the chain record ``batch["mix_partner"]`` and
    ``batch["mix_lambda"]``) it is mixup's loss ``λ_i·CE(y_i) + (1 − λ_i)·CE(y_partner[i])``, over the
    examples whose two labels are known."""
    check_in_range("label_smoothing", label_smoothing, 0.0, 1.0)

    def compute(inputs: LossInputs, rng):
        logits = inputs.output(participant, method=name).logits
        if MIX_PARTNER in inputs.batch:
            return _mixed_cross_entropy(logits, inputs, name, label_smoothing)
        return losses.cross_entropy(logits, inputs.labels(name), label_smoothing=label_smoothing,
                                    mask=inputs.label_mask)

    return stateless_method(name, compute, weight=weight, needs_labels=True, trained=(participant,))
