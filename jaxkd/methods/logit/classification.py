"""Label cross-entropy and Hinton KD as methods."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_in_range, check_temperature
from jaxkd.methods.base import Method, Weight, logit_method, stateless_method
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["ce", "kd"]


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


@register("kd", paper="Hinton, Vinyals & Dean, *Distilling the Knowledge in a Neural Network*, 2015",
          losses=("kd",), contract=LOGIT_ROLES)
def kd(
    *, temperature: float = 4.0, student: str = "student", teacher: str = "teacher", weight: Weight = 1.0,
    name: str = "kd",
) -> Method:
    """Hinton KD: ``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))`` (:func:`jaxkd.losses.kd`).

    ``student``/``teacher`` name the participants in the two roles (default: the student learns from the
    teacher); the target is gradient-stopped, so ``kd(student="peer", teacher="student")`` trains only the
    peer."""
    check_temperature("temperature", temperature)
    return logit_method(name, losses.kd, weight=weight, temperature=temperature, student=student, teacher=teacher)
