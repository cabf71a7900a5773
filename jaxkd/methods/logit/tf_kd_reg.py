"""Tf-KD_reg as a method: teacher-free KD against a virtual teacher made from the labels (no teacher network)."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_in_range, check_temperature
from jaxkd.methods.base import Method, Weight, stateless_method
from jaxkd.methods.registry import register

__all__ = ["tf_kd_reg"]


@register(
    "tf_kd_reg",
    paper="Yuan et al., *Revisiting Knowledge Distillation via Label Smoothing Regularization* (Tf-KD), CVPR 2020",
    losses=("tf_kd_virtual_teacher",),
    status="supported (Tf-KD_reg as the official code computes it; Tf-KD_self: a born-again generation, "
    "`experiments/born_again.py`)",
)
def tf_kd_reg(
    *, correct_prob: float = 0.99, temperature: float = 20.0, class_mean: bool = True, participant: str = "student",
    weight: Weight = 1.0, name: str = "tf_kd_reg",
) -> Method:
    """Tf-KD_reg (Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing Regularization", CVPR 2020):
    the KL from a virtual teacher (``correct_prob`` on the label, the rest uniform, softened at
    ``temperature``) to the participant's softmax (:func:`jaxkd.losses.tf_kd_virtual_teacher`, exactly the
    official ``loss_kd_regularization``'s regularizer, including its division by the number of classes).

    The official total ``(1 − α)·CE + α·multiplier·L`` is a chain: ResNet-18 on CIFAR-100 (``α = 0.1``, ``T = 20``,
    ``multiplier = 100``) is ``"0.9 * ce + 10 * tf_kd_reg(temperature=20)"``.

    Tf-KD_self (the trained student as its own teacher, KD with the same architecture) is not this method: it is
    a born-again generation (``experiments/born_again.py``, config ``tf_kd_self``).
    """
    check_in_range("correct_prob", correct_prob, 0.0, 1.0)
    check_temperature("temperature", temperature)
    if not isinstance(class_mean, bool):
        raise ValueError(f"class_mean must be True or False, got class_mean={class_mean!r}")
    return stateless_method(
        name,
        lambda inputs, rng: losses.tf_kd_virtual_teacher(
            inputs.output(participant, method=name).logits, inputs.labels(name), correct_prob=correct_prob,
            temperature=temperature, class_mean=class_mean, mask=inputs.label_mask,
        ),
        weight=weight, needs_labels=True, trained=(participant,),
    )
