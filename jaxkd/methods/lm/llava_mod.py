"""LLaVA-MoD's recipe as one method: mimic distillation, then preference distillation, in one state."""

from __future__ import annotations

from jaxkd.checks import check_int, check_nonnegative
from jaxkd.methods.base import Method, after, chain, multiply_weights, until
from jaxkd.methods.lm.preference_kd import preference_kd
from jaxkd.methods.registry import register
from jaxkd.methods.lm.token_kd import token_kd

__all__ = ["llava_mod"]


@register(
    "llava_mod", inputs="tokens", example="mimic_steps=0, prompt_length=3",
    paper="Shu et al., *LLaVA-MoD: Making LLaVA Tiny via MoE Knowledge Distillation*, 2024",
    losses=("forward_kl", "dpo_loss", "kto_pair_loss"),
    status="supported (two stages in one state; self-made preference pairs, see preference_kd)",
)
def llava_mod(
    *,
    mimic_steps: int,
    beta: float = 0.1,
    loss_type: str = "dpo",
    prompt_length: int = 16,
    preference_weight: float = 1.0,
    student: str = "student",
    teacher: str = "teacher",
    name: str = "llava_mod",
) -> Method:
    """LLaVA-MoD's recipe as one method: **mimic distillation** — next-token CE plus the forward KL from
    the teacher per token — for ``mimic_steps``, then **preference distillation** —
    :func:`preference_kd` (DPO with the teacher as reference) plus the CE — for the rest. The stages are
    :func:`until` / :func:`after` weights in one chain, so one train state and one compiled step run both
    (two programs' worth of work, only the active stage's terms count). ``student``/``teacher`` name the
    participants in the two roles of every term, as in :func:`~jaxkd.methods.kd`."""
    check_int("mimic_steps", mimic_steps, low=0)
    check_nonnegative("preference_weight", preference_weight)
    from jaxkd.methods.lm.lm_ce import lm_ce

    mimic = until(mimic_steps) * token_kd(divergence="forward_kl", student=student, teacher=teacher, name="mimic")
    preference = preference_kd(beta=beta, loss_type=loss_type, prompt_length=prompt_length, student=student, teacher=teacher,
                               name="preference", weight=multiply_weights(preference_weight, after(mimic_steps)))
    return chain(lm_ce(participant=student), mimic, preference, name=name)
