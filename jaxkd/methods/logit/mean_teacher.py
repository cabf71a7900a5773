"""Mean teacher as a method: the teacher is the exponential moving average of the student's own parameters,
carried in the method state (so it is checkpointed with the train state) and updated after each optimizer step."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_choice, check_number
from jaxkd.losses.logit.mean_teacher import CONSISTENCIES
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, StepInfo, Weight
from jaxkd.methods.registry import register
from jaxkd.participants import STUDENT
from jaxkd.sharding import unbox

__all__ = ["ema_decay", "ema_update", "mean_teacher"]

PyTree = Any

#: Where the average starts: the student's initial variables, or (the official code) its own initialization.
STARTS = ("student", "independent")


def ema_decay(step: jax.Array, decay: float, *, warmup: bool = True) -> jax.Array:
    """The decay used by the ``step``-th update (``step = 1`` for the first): ``min(1 − 1/(step + 1), decay)``
    with ``warmup`` — the official ``update_ema_variables`` (``CuriousAI/mean-teacher``, ``pytorch/main.py``),
    called with the global step already incremented — else ``decay``. During the warm-up the average is the
    plain mean of the parameters seen so far (initial ones included)."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    s = jnp.asarray(step, jnp.float32)
    return jnp.minimum(1.0 - 1.0 / (s + 1.0), decay)


def ema_update(average: PyTree, params: PyTree, decay: jax.Array) -> PyTree:
    """``θ' ← d·θ' + (1 − d)·θ`` leaf by leaf, in float32 (an average of bfloat16 parameters would lose the
    ``(1 − d)``-sized steps)."""
    return jax.tree.map(lambda a, p: decay * a + (1.0 - decay) * jnp.asarray(p, jnp.float32), average, params)


@register(
    "mean_teacher", example="decay=0.9, start='independent'",
    paper="Tarvainen & Valpola, *Mean teachers are better role models*, NeurIPS 2017",
    losses=("mean_teacher",),
    status="supported (EMA of the student's parameters in method state, official decay warm-up; one input view: "
    "the two views' noise is the dropout's)",
)
def mean_teacher(
    *,
    decay: float = 0.999,
    consistency: str = "mse",
    warmup: bool = True,
    start: str = "student",
    weight: Weight = 1.0,
    name: str = "mean_teacher",
) -> Method:
    """Mean teacher (Tarvainen & Valpola, "Mean teachers are better role models: Weight-averaged consistency
    targets improve semi-supervised deep learning results", NeurIPS 2017), official code
    ``CuriousAI/mean-teacher`` (``pytorch/main.py``).

    The method state holds ``{"params": θ', **model_state}``: ``θ'`` the exponential moving average of the
    student's parameters (float32), and the EMA model's own non-parameter collections (BatchNorm statistics).
    ``start="student"`` (default) starts the average at the student's *initial* variables, so the first step's
    consistency is 0 and, during the warm-up, ``θ'_k`` is the mean of ``θ_0..θ_k``; ``start="independent"`` is the
    official code's: the EMA model is a second, independently initialized copy of the architecture
    (``ema_model = create_model(ema=True)``, initialized here from the method's key), which the warm-up then
    averages in as if it were ``θ_0``. Each step:

    * loss: the student's model is run again with ``θ'`` (gradient-stopped), **in train mode** as the official
      code runs its ``ema_model`` (``ema_model.train()``: BatchNorm normalizes with the batch's statistics, and
      the EMA model's running statistics are updated by this forward of its own — they are *not* averaged from
      the student's); its logits are the target of :func:`jaxkd.losses.mean_teacher` (``consistency="mse"``,
      the squared error of the softmaxes over ``C``, the paper's and the official default; or ``"kl"``);
    * update (after the optimizer step ``k = 1, 2, …``): ``θ' ← d_k·θ' + (1 − d_k)·θ`` with
      ``d_k = min(1 − 1/(k + 1), decay)`` (``warmup=True``, the official ``update_ema_variables``: the true mean
      of everything averaged so far while ``1 − 1/(k + 1) < decay``), or ``d_k = decay``.

    The official code draws two augmentations of each image, one per model (``TransformTwice``); here both
    models see the batch's one view, and their noise is the dropout's (each forward draws its own). The
    official consistency weight ramps up (``consistency * sigmoid_rampup(epoch, consistency_rampup)``): give
    ``weight`` a schedule. Labels are not read: ``"ce + mean_teacher"`` for the supervised part (the ``ce``
    term skips unlabeled examples, ``batch["labeled"]``). Evaluation scores the student; the EMA model's
    variables are ``state.method_vars.state[name]`` (cast to the student's dtypes to run it).
    Metrics: ``decay``, the ``d_k`` the update after this step uses.
    """
    check_number("decay", decay, low=0.0, high=1.0, high_open=True)
    check_choice("consistency", consistency, CONSISTENCIES)
    if not isinstance(warmup, bool):
        raise ValueError(f"warmup must be True or False, got warmup={warmup!r}")
    check_choice("start", start, STARTS)

    def init(rng, inputs: LossInputs) -> MethodVars:
        student = inputs.student_variables
        if student is None:
            raise ValueError(f"{name!r} averages the student's parameters, but the step's inputs hold variables of "
                             f"{sorted(inputs.variables)}")
        if start == "independent":  # the official second model: the same architecture, its own initialization
            participant = inputs.participant(STUDENT, method=name)
            x = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), participant.model_input(inputs.batch, name=STUDENT))
            student = unbox(participant.model.init(rng, x))
        params = jax.tree.map(lambda p: jnp.array(p, jnp.float32), student["params"])
        model_state = {k: jax.tree.map(jnp.copy, v) for k, v in student.items() if k != "params"}
        return MethodVars(state={"params": params, **model_state})

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        participant = inputs.participant(STUDENT, method=name)
        student = inputs.student_variables
        # The EMA model in the student's dtypes (a bfloat16 student gets a bfloat16 copy of the float32 average).
        ema = jax.tree.map(lambda a, s: jnp.asarray(a, s.dtype), dict(vars.state), dict(student))
        x = participant.model_input(inputs.batch, name=STUDENT)
        out = participant.model.apply(jax.lax.stop_gradient(ema), x, train=True, rngs={"dropout": rng})
        target = jax.lax.stop_gradient(out.logits)
        value = losses.mean_teacher(inputs.output(STUDENT, method=name).logits, target, consistency=consistency,
                                    mask=inputs.example_mask)
        model_state = jax.tree.map(lambda new, old: jnp.asarray(new, old.dtype), dict(out.model_state),
                                   {k: v for k, v in vars.state.items() if k != "params"})
        metrics = {"decay": ema_decay(inputs.step + 1, decay, warmup=warmup)}
        return value, LossAux(metrics, {**vars.state, **jax.lax.stop_gradient(model_state)})

    def update(params, state, info: StepInfo):
        d = ema_decay(info.step, decay, warmup=warmup)
        return {**state, "params": ema_update(state["params"], info.student_params, d)}

    return Method(name=name, loss=loss, init=init, update=update, weight=weight, needs=Needs())
