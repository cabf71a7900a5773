"""Distillation methods as composable transforms, shaped like optax's ``GradientTransformation``.

A :class:`Method` is a small record of pure functions:

* ``init(rng, inputs) -> MethodVars(params, state)`` — the method's trainable parameters (a FitNets
  connector, branch heads; stepped by the same optimizer as the student) and its non-trainable state
  (TAID's ``t``, a memory bank). ``inputs`` holds *abstract* model outputs (shapes and dtypes only), so a
  connector can size itself from the features it will see.
* ``loss(vars, inputs, rng) -> (scalar, LossAux(metrics, state))`` — differentiated with respect to the
  student parameters and ``vars.params``; ``state`` is the method state after this forward pass (for
  updates that need the forward's values, e.g. a memory bank write or the observed loss).
* ``update(params, state, info) -> state`` — runs after the optimizer step (an EMA, a schedule).
* ``predict(vars, student_outputs) -> logits`` (optional) — what evaluation scores, for methods that
  change inference (a second head combined with the first).

:func:`chain` (or ``+``) composes methods: each keeps its variables under its own name, the total is the
weighted sum, and every term is reported as a metric. ``weight`` may be a float or a schedule
``step -> weight`` (as optax schedules are).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence, Union

import flax.struct
import jax
import jax.numpy as jnp

from jaxkd.models.base import Outputs

Array = jax.Array
PyTree = Any
Weight = Union[float, Callable[[Array], Array]]


@flax.struct.dataclass
class LossInputs:
    """Everything a method's loss may look at in one step.

    Attributes:
      student: the student's forward pass (train mode).
      teacher: the teacher's forward pass (eval mode, gradient stopped), or ``None`` without a teacher.
      batch: the batch mapping (``"image"``, ``"label"``, optional ``"mask"`` of valid examples, …).
      step: the optimizer step count before this update (int32 scalar).
      student_variables: ``{"params": ..., **model_state}`` of the student *being differentiated* —
        for methods that run the student again (a frozen copy, a one-step lookahead). At ``init`` these
        are the student's initial variables.
      student_model: the student :class:`~jaxkd.models.Model` (static), to apply those variables.
      input_key: which batch entry is the model input (static).
    """

    student: Outputs
    teacher: Outputs | None
    batch: Mapping[str, Array]
    step: Array
    student_variables: PyTree = None
    student_model: Any = flax.struct.field(pytree_node=False, default=None)
    input_key: str = flax.struct.field(pytree_node=False, default="image")

    @property
    def model_input(self) -> Array:
        return self.batch[self.input_key]


@flax.struct.dataclass
class MethodVars:
    """A method's variables: ``params`` are trained with the student; ``state`` is carried across steps."""

    params: PyTree = flax.struct.field(default_factory=dict)
    state: PyTree = flax.struct.field(default_factory=dict)


class LossAux(NamedTuple):
    metrics: Mapping[str, Array]
    state: PyTree


@flax.struct.dataclass
class StepInfo:
    """What ``update`` sees after the optimizer step."""

    step: Array
    student_params: PyTree
    metrics: Mapping[str, Array]


def _no_vars(rng: Array, inputs: LossInputs) -> MethodVars:
    del rng, inputs
    return MethodVars()


def _keep_state(params: PyTree, state: PyTree, info: StepInfo) -> PyTree:
    del params, info
    return state


@dataclasses.dataclass(frozen=True, eq=False)
class Method:
    """A distillation objective with its own variables. Build one with a factory (``jaxkd.methods.kd``).

    Attributes:
      name: the key of this method's variables and metrics inside a :func:`chain`.
      loss: ``(vars, inputs, rng) -> (scalar, LossAux)``.
      init: ``(rng, inputs) -> MethodVars``; the default has no variables.
      update: ``(params, state, info) -> state`` after the optimizer step; the default keeps the state.
      weight: multiplier (or schedule ``step -> multiplier``) of this term in a chain.
      batch_keys: batch entries the loss reads (checked when the train state is created).
      needs_teacher: whether the loss reads the teacher's outputs.
      predict: ``(vars, student_outputs) -> logits`` used by evaluation, or ``None`` for the student's
        own logits.
      terms: for a chain, its members (empty for a single method).
    """

    name: str
    loss: Callable[[MethodVars, LossInputs, Array], tuple[Array, LossAux]]
    init: Callable[[Array, LossInputs], MethodVars] = _no_vars
    update: Callable[[PyTree, PyTree, StepInfo], PyTree] = _keep_state
    weight: Weight = 1.0
    batch_keys: tuple[str, ...] = ()
    needs_teacher: bool = False
    predict: Callable[[MethodVars, Outputs], Array] | None = None
    terms: tuple["Method", ...] = ()

    def named(self, name: str) -> "Method":
        """The same method under another name (to use one method twice in a chain)."""
        return dataclasses.replace(self, name=name)

    def weighted(self, weight: Weight) -> "Method":
        return dataclasses.replace(self, weight=weight)

    def __add__(self, other: "Method") -> "Method":
        if not isinstance(other, Method):
            return NotImplemented
        return chain(self, other)

    def __mul__(self, weight: Weight) -> "Method":
        if isinstance(weight, Method):
            return NotImplemented
        if callable(weight):
            return self.weighted(weight)
        if callable(self.weight):
            return self.weighted(lambda step, w=self.weight: weight * w(step))
        return self.weighted(weight * self.weight)

    __rmul__ = __mul__


def require(batch: Mapping[str, Array], key: str, *, method: str) -> Array:
    """``batch[key]`` with an error that names the method that needs it and the keys the batch has."""
    try:
        return batch[key]
    except KeyError:
        raise ValueError(
            f"method {method!r} needs batch[{key!r}], but the batch has keys {sorted(batch)}"
        ) from None


def require_teacher(inputs: LossInputs, *, method: str) -> Outputs:
    if inputs.teacher is None:
        raise ValueError(f"method {method!r} needs a teacher, but the train state has none")
    return inputs.teacher


def example_mask(batch: Mapping[str, Array]) -> Array | None:
    """The per-example validity mask of a batch (eval batches are padded), or ``None``."""
    return batch.get("mask")


def resolve_weight(weight: Weight, step: Array) -> Array:
    return jnp.asarray(weight(step) if callable(weight) else weight, jnp.float32)


def chain(*methods: Method, name: str = "chain") -> Method:
    """Composes methods into one: ``L = Σ_i w_i(step) · L_i``.

    Each member's variables live under ``vars.params[member.name]`` / ``vars.state[member.name]``.
    Metrics: ``"<member>"`` is the member's unweighted loss, ``"<member>/<metric>"`` its own metrics,
    ``"<member>/weight"`` the weight used, and ``"loss"`` the weighted total. Nested chains are
    flattened; names must be unique (rename with ``method.named("kd2")``).
    """
    flat: list[Method] = []
    for m in methods:
        if not isinstance(m, Method):
            raise TypeError(f"chain takes Method objects, got {type(m).__name__}")
        if m.terms:
            if m.weight != 1.0:
                raise ValueError("a weighted chain cannot be nested; weight its members instead")
            flat.extend(m.terms)
        else:
            flat.append(m)
    if not flat:
        raise ValueError("chain needs at least one method")
    names = [m.name for m in flat]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"method names in a chain must be unique, repeated: {duplicates}; use .named()")
    terms = tuple(flat)

    def init(rng: Array, inputs: LossInputs) -> MethodVars:
        rngs = jax.random.split(rng, len(terms))
        members = [m.init(r, inputs) for m, r in zip(terms, rngs)]
        return MethodVars(
            params={m.name: v.params for m, v in zip(terms, members)},
            state={m.name: v.state for m, v in zip(terms, members)},
        )

    def loss(vars: MethodVars, inputs: LossInputs, rng: Array) -> tuple[Array, LossAux]:
        rngs = jax.random.split(rng, len(terms))
        total = jnp.zeros((), jnp.float32)
        metrics: dict[str, Array] = {}
        new_state = {}
        for m, r in zip(terms, rngs):
            member_vars = MethodVars(vars.params[m.name], vars.state[m.name])
            value, aux = m.loss(member_vars, inputs, r)
            value = jnp.asarray(value, jnp.float32)
            w = resolve_weight(m.weight, inputs.step)
            total = total + w * value
            metrics[m.name] = value
            if callable(m.weight):
                metrics[f"{m.name}/weight"] = w
            metrics.update({f"{m.name}/{k}": v for k, v in aux.metrics.items()})
            new_state[m.name] = aux.state
        metrics["loss"] = total
        return total, LossAux(metrics, new_state)

    def update(params: PyTree, state: PyTree, info: StepInfo) -> PyTree:
        return {m.name: m.update(params[m.name], state[m.name], info) for m in terms}

    predictors = [m for m in terms if m.predict is not None]
    if len(predictors) > 1:
        raise ValueError(
            f"at most one method in a chain may change inference, got {[m.name for m in predictors]}"
        )
    predict = None
    if predictors:
        member = predictors[0]

        def predict(vars: MethodVars, outputs: Outputs) -> Array:
            return member.predict(MethodVars(vars.params[member.name], vars.state[member.name]), outputs)

    return Method(
        name=name,
        loss=loss,
        init=init,
        update=update,
        batch_keys=tuple(dict.fromkeys(k for m in terms for k in m.batch_keys)),
        needs_teacher=any(m.needs_teacher for m in terms),
        predict=predict,
        terms=terms,
    )


def as_chain(method: Method | Sequence[Method]) -> Method:
    """A chain of whatever was given, so train states always hold variables keyed by method name."""
    if isinstance(method, Method):
        return method if method.terms else chain(method)
    return chain(*method)
