"""TAID as a method: the interpolation ``t`` lives in the method state across steps."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxkd.batch import MASK, TOKENS
from jaxkd import losses
from jaxkd.checks import check_in_range, check_int, check_positive
from jaxkd.losses.core import Array
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight, check_roles
from jaxkd.losses.lm.tokens import shift_logits
from jaxkd.methods.registry import LOGIT_ROLES, register
from jaxkd.methods.lm.tokens import lm_targets

__all__ = ["TAIDState", "taid", "taid_init_state", "taid_update"]


@register(
    "taid", example="total_steps=10",
    paper="Shing et al., *TAID: Temporally Adaptive Interpolated Distillation*, ICLR 2025",
    losses=("taid",),
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
    adaptive rule (:func:`jaxkd.methods.taid_update`) using this step's loss value, never below the
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
        return MethodVars(state=taid_init_state(t_start))

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        state = vars.state
        zs, zt = inputs.output(student, method=name).logits, inputs.target(teacher, method=name).logits
        if tokens:
            _, target_mask, normalizer = lm_targets(inputs.batch)
            value = losses.taid(shift_logits(zs), shift_logits(zt), t=state.t, mask=target_mask, normalizer=normalizer)
        else:
            value = losses.taid(zs, zt, t=state.t, mask=inputs.example_mask)
        new_state = taid_update(
            state, value, inputs.step, total_steps=total_steps, t_start=t_start, t_end=t_end, alpha=alpha, beta=beta,
        )
        return value, LossAux({"t": state.t}, new_state)

    return Method(name=name, loss=loss, init=init, weight=weight,
                  needs=Needs(participants=(student, teacher), trained=(student,),
                              batch_keys=(TOKENS, MASK) if tokens else ()))


@flax.struct.dataclass
class TAIDState:
    """``t``, the previous loss and the momentum of its relative decrease (official initial values)."""

    t: Array
    prev_loss: Array
    momentum: Array
    initialized: Array


def taid_init_state(t_start: float) -> TAIDState:
    return TAIDState(
        t=jnp.asarray(t_start, jnp.float32),
        prev_loss=jnp.zeros((), jnp.float32),
        momentum=jnp.zeros((), jnp.float32),
        initialized=jnp.zeros((), bool),
    )


def taid_update(
    state: TAIDState,
    loss_value: Array,
    step: Array,
    *,
    total_steps: int,
    t_start: float = 0.4,
    t_end: float = 1.0,
    alpha: float = 5e-4,
    beta: float = 0.99,
) -> TAIDState:
    """TAID's adaptive update of ``t`` after a step whose (detached) loss was ``J``.

    First call: remember ``J`` and keep ``t``. Then ``δ = (J_prev − J)/(J_prev + 1e-15)``,
    ``m ← β m + (1 − β) δ``, ``t ← min(t_end, max(t_lin, t + α·sigmoid(m)·(1 − t)))`` with the linear
    floor ``t_lin = t_start + (t_end − t_start)·step/total_steps``.
    """
    check_int("total_steps", total_steps, low=1)
    j = jax.lax.stop_gradient(jnp.asarray(loss_value, jnp.float32))
    delta = (state.prev_loss - j) / (state.prev_loss + 1e-15)
    momentum = beta * state.momentum + (1.0 - beta) * delta
    t_lin = t_start + (t_end - t_start) * jnp.asarray(step, jnp.float32) / total_steps
    t_new = jnp.minimum(t_end, jnp.maximum(t_lin, state.t + alpha * jax.nn.sigmoid(momentum) * (1.0 - state.t)))
    first = ~state.initialized
    return TAIDState(
        t=jnp.where(first, state.t, t_new),
        prev_loss=j,
        momentum=jnp.where(first, state.momentum, momentum),
        initialized=jnp.ones((), bool),
    )
