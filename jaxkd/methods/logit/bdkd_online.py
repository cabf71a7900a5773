"""BD-KD's online form as a method: student and teacher trained together, each on the other's entropy-balanced divergences."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_temperature
from jaxkd.methods.base import Method, Weight, stateless_method
from jaxkd.methods.registry import register
from jaxkd.methods.logit.bdkd import balanced_divergences

__all__ = ["bdkd_online"]


@register(
    "bdkd_online",
    paper="Amara et al., *BD-KD: Balancing the Divergences for Online KD*, 2022 (online setting)",
    losses=("bdkd", "cross_entropy"),
    status="from the paper's text",
)
def bdkd_online(*, temperature: float = 4.0, weight: Weight = 1.0, name: str = "bdkd_online") -> Method:
    """BD-KD's online setting: the teacher is trained together with the student, from scratch.

    ``L = CE(z_s) + CE(z_t) + BD(z_s ← sg z_t) + BD(z_t ← sg z_s)`` with ``BD`` the balanced divergence
    :func:`jaxkd.losses.bdkd` (the first argument learns, the second is a gradient-stopped target). Each
    network learns from the labels and, through the same entropy-balanced forward + reverse KL, from the
    other — the abstract's "conventional online distillation loss modified on both the student and the
    teacher side". ASSUMPTION, as for :func:`bdkd`: the paper's method section could not be read, so the
    teacher's side reuses the student's balanced divergence with the roles swapped. The whole objective:
    do not add ``ce``. Needs a *trained* participant named ``"teacher"``.

    Metrics: ``student_ce``, ``teacher_ce``, ``student_bd``, ``teacher_bd``.
    """
    check_temperature("temperature", temperature)

    def compute(inputs, rng):
        labels, mask, example_mask = inputs.labels(name), inputs.label_mask, inputs.example_mask
        # Both networks are trained here: each one's own logits learn, the other's are its target.
        zs, zt = inputs.output("student", method=name).logits, inputs.output("teacher", method=name).logits
        student_bd, _ = balanced_divergences(zs, inputs.target("teacher", method=name).logits, example_mask, temperature)
        teacher_bd, _ = balanced_divergences(zt, inputs.target("student", method=name).logits, example_mask, temperature)
        student_ce = losses.cross_entropy(zs, labels, mask=mask)
        teacher_ce = losses.cross_entropy(zt, labels, mask=mask)
        metrics = {"student_ce": student_ce, "teacher_ce": teacher_ce, "student_bd": student_bd, "teacher_bd": teacher_bd}
        return student_ce + teacher_ce + student_bd + teacher_bd, metrics

    return stateless_method(name, compute, weight=weight, needs_labels=True, trained=("teacher",))
