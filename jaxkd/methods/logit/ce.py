"""Label cross-entropy as a method: the data term of supervised training and of most distillation recipes."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_in_range
from jaxkd.methods.base import Method, Weight, stateless_method
from jaxkd.methods.registry import register

__all__ = ["ce"]


@register("ce", paper="Szegedy et al., *Rethinking the Inception Architecture* (label smoothing), 2016",
          losses=("cross_entropy",))
def ce(
    *, label_smoothing: float = 0.0, participant: str = "student", weight: Weight = 1.0, name: str = "ce"
) -> Method:
    """Cross-entropy of a participant's logits (the student's by default; ``participant="peer"`` for a
    trained peer or an online teacher) with the labels (:func:`jaxkd.losses.cross_entropy`), over the
    labeled examples of the batch."""
    check_in_range("label_smoothing", label_smoothing, 0.0, 1.0)
    return stateless_method(
        name,
        lambda inputs, rng: losses.cross_entropy(
            inputs.output(participant, method=name).logits, inputs.labels(name), label_smoothing=label_smoothing,
            mask=inputs.label_mask,
        ),
        weight=weight, needs_labels=True, trained=(participant,),
    )
