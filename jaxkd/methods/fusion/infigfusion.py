"""InfiGFusion as a method: the graph-on-logits term between the student and a teacher, over their top-k
next-token logits (:mod:`jaxkd.losses.fusion.infigfusion`). The teacher runs in the step, frozen and
gradient-stopped."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_choice, check_int
from jaxkd.losses.lm.tokens import shift_logits
from jaxkd.methods.base import LossInputs, Method, Weight, check_roles, stateless_method
from jaxkd.methods.registry import LOGIT_ROLES, register
from jaxkd.methods.lm.tokens import LM_KEYS, lm_targets

__all__ = ["infigfusion"]


@register(
    "infigfusion", inputs="tokens",
    paper="Wang et al., *InfiGFusion: Graph-on-Logits Distillation via Efficient Gromov-Wasserstein for Model Fusion*, NeurIPS 2025",
    losses=("infigfusion",),
    status="reconstructed from the abstract: node statistic and cost of the sorting GW are assumptions (see the loss)",
    contract=LOGIT_ROLES,
)
def infigfusion(
    *,
    k: int = 10,
    values: str = "probs",
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "infigfusion",
) -> Method:
    """InfiGFusion's graph-on-logits distillation (GLD) between the student and one teacher, per sequence
    (:func:`jaxkd.losses.infigfusion` over the next-token logits of the target positions). The paper
    uses it next to a token-level term and SFT: combine with ``lm_ce`` and ``token_kd``. ``values="probs"``
    by default: on raw logits (the abstract's wording) the graph's scale follows the logits' and a
    weight that suits one model diverges on another (measured on the stdlib LM run). ``student``/``teacher``
    name the participants in the two roles, as in :func:`~jaxkd.methods.token_kd` (the teacher's logits are a
    gradient-stopped target)."""
    check_roles(name, student, teacher)
    check_int("k", k, low=1)
    check_choice("values", values, ("logits", "probs"))

    def compute(inputs: LossInputs, rng):
        _, target_mask, _ = lm_targets(inputs.batch)
        return losses.infigfusion(shift_logits(inputs.output(student, method=name).logits),
                                      shift_logits(inputs.target(teacher, method=name).logits), k=k, values=values,
                                      mask=target_mask)

    return stateless_method(name, compute, weight=weight, participants=(student, teacher),
                            trained=(student,), batch_keys=LM_KEYS)
