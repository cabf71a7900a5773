"""TAID as a method transform: the interpolation ``t`` lives in the method state across steps."""

from __future__ import annotations

import jax

from jaxkd.losses._core import check_in_range, check_positive
from jaxkd.losses.taid import taid as taid_loss
from jaxkd.losses.taid import taid_init_state, taid_update
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Weight, example_mask, require_teacher


def taid(
    *,
    total_steps: int,
    t_start: float = 0.4,
    t_end: float = 1.0,
    alpha: float = 5e-4,
    beta: float = 0.99,
    weight: Weight = 1.0,
    name: str = "taid",
) -> Method:
    """TAID (Shing et al., "TAID: Temporally Adaptive Interpolated Distillation…", ICLR 2025).

    Loss :func:`jaxkd.losses.taid.taid` at the current ``t``; after each forward, ``t`` moves by the
    paper's adaptive rule (:func:`jaxkd.losses.taid.taid_update`) using this step's loss value, never
    below the linear schedule from ``t_start`` to ``t_end`` over ``total_steps``. Defaults are the
    official ones (t_start 0.4, t_end 1.0, α 5e-4, β 0.99). Metrics: ``t``.
    """
    check_positive("total_steps", total_steps)
    check_in_range("t_start", t_start, 0.0, 1.0)
    check_in_range("t_end", t_end, t_start, 1.0)
    check_in_range("beta", beta, 0.0, 1.0)
    check_positive("alpha", alpha)

    def init(rng: jax.Array, inputs: LossInputs) -> MethodVars:
        del rng, inputs
        return MethodVars(state=taid_init_state(t_start))

    def loss(vars: MethodVars, inputs: LossInputs, rng: jax.Array):
        del rng
        teacher = require_teacher(inputs, method=name)
        state = vars.state
        value = taid_loss(
            inputs.student.logits, jax.lax.stop_gradient(teacher.logits), t=state.t,
            mask=example_mask(inputs.batch),
        )
        new_state = taid_update(
            state, value, inputs.step, total_steps=total_steps, t_start=t_start, t_end=t_end,
            alpha=alpha, beta=beta,
        )
        return value, LossAux({"t": state.t}, new_state)

    return Method(name=name, loss=loss, init=init, weight=weight, needs_teacher=True)
