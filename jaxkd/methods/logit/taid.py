"""TAID as a method: the interpolation ``t`` lives in the method state across steps."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_in_range, check_int, check_positive
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight, check_roles
from jaxkd.losses.lm.tokens import shift_logits
from jaxkd.methods.registry import LOGIT_ROLES, register
from jaxkd.methods.lm.tokens import lm_targets

__all__ = ["taid"]


@register(
    "taid", example="total_steps=10",
    paper="Shing et al., *TAID: Temporally Adaptive Interpolated Distillation*, ICLR 2025",
    losses=("taid", "taid_update"),
    status="supported (adaptive `t` in method state)",
    contract=LOGIT_ROLES,
)
def taid(
    *,
    total_steps: int,
    t_start: float = 0.4,
    t_end: float = 1.0,
    alpha: float = 5e-4,
    beta: float = 0.99,
    tokens: bool = False,
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "taid",
) -> Method:
    """TAID (Shing et al., "TAID: Temporally Adaptive Interpolated Distillation…", ICLR 2025).

    Loss :func:`jaxkd.losses.taid` at the current ``t``; after each forward, ``t`` moves by the paper's
    adaptive rule (:func:`jaxkd.losses.taid_update`) using this step's loss value, never below the
    linear schedule from ``t_start`` to ``t_end`` over ``total_steps``. Defaults are the official ones
    (t_start 0.4, t_end 1.0, α 5e-4, β 0.99). Metrics: ``t``.

    ``tokens=True``: TAID for language models, as the paper trains them — the interpolated next-token
    target per token (position ``t``'s logits against the teacher's at ``t``, both scoring token ``t+1``),
    averaged over the batch's target tokens (:func:`jaxkd.losses.next_token_targets`).

    ``student``/``teacher`` name the participants in the two roles, as in :func:`~jaxkd.methods.kd`
    (the teacher's logits are a gradient-stopped target).
    """
    check_int("total_steps", total_steps, low=1)
    check_in_range("t_start", t_start, 0.0, 1.0)
    check_in_range("t_end", t_end, t_start, 1.0)
    check_in_range("beta", beta, 0.0, 1.0)
    check_positive("alpha", alpha)
    check_roles(name, student, teacher)

    def init(rng, inputs: LossInputs) -> MethodVars:
        return MethodVars(state=losses.taid_init_state(t_start))

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        state = vars.state
        zs, zt = inputs.output(student, method=name).logits, inputs.target(teacher, method=name).logits
        if tokens:
            _, target_mask, normalizer = lm_targets(inputs.batch)
            value = losses.taid(shift_logits(zs), shift_logits(zt), t=state.t, mask=target_mask, normalizer=normalizer)
        else:
            value = losses.taid(zs, zt, t=state.t, mask=inputs.example_mask)
        new_state = losses.taid_update(
            state, value, inputs.step, total_steps=total_steps, t_start=t_start, t_end=t_end, alpha=alpha, beta=beta,
        )
        return value, LossAux({"t": state.t}, new_state)

    return Method(name=name, loss=loss, init=init, weight=weight,
                  needs=Needs(participants=(student, teacher), trained=(student,),
                              batch_keys=("tokens", "mask") if tokens else ()))
