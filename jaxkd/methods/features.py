"""What feature methods share: reading participants' features by name, trainable connectors built from
the abstract feature shapes ``init`` receives, and :func:`feature_method` for the common "loss between a
student feature (through a connector) and a teacher feature" shape.

A connector is any Flax Linen module whose ``__call__`` takes the feature(s) and a keyword ``train``.
:func:`module_init` builds its variables from the *abstract* outputs a method's ``init`` sees (shapes
only; no zeros by hand), and :func:`module_apply` runs it in the loss. Its ``params`` are method
parameters (stepped with the student by the same optimizer, as RepDistiller and mdistiller step their
connectors); its other collections (BatchNorm statistics) are method state, updated by the forward pass::

    def init(rng, inputs):
        s = student_feature(inputs, "stage3", method=name)          # abstract: shape and dtype only
        t = teacher_feature(inputs, "stage3", method=name)
        return module_init(ConvRegressor.between(s.shape, t.shape), rng, s)

    def loss(vars, inputs, rng):
        s = student_feature(inputs, "stage3", method=name)
        t = teacher_feature(inputs, "stage3", method=name)
        s, state = module_apply(ConvRegressor.between(s.shape, t.shape), vars, s)
        return losses.fitnets(s, t, mask=inputs.example_mask), LossAux({}, state)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight
from jaxkd.models.base import get_feature

Array = jax.Array

__all__ = [
    "apply_participant",
    "dense_layer",
    "feature_method",
    "feature_of",
    "module_apply",
    "module_init",
    "param_at",
    "participant_variables",
    "student_feature",
    "teacher_feature",
]


def feature_of(inputs: LossInputs, participant: str, name: str, *, method: str, target: bool = False) -> Array:
    """Participant ``participant``'s feature ``name``: from :meth:`LossInputs.output` (differentiated), or with
    ``target=True`` from :meth:`LossInputs.target` (gradient-stopped).

    Raises ``ValueError`` naming the method when the participant is missing (listing the participants)
    or does not produce ``name`` (listing the features it does produce).
    """
    outputs = inputs.target(participant, method=method) if target else inputs.output(participant, method=method)
    try:
        return get_feature(outputs, name, who=f"participant {participant!r}")
    except ValueError as e:
        raise ValueError(f"{method!r}: {e}") from None


def student_feature(inputs: LossInputs, name: str, *, method: str, participant: str = "student") -> Array:
    """The learner's feature (carries gradients)."""
    return feature_of(inputs, participant, name, method=method)


def teacher_feature(inputs: LossInputs, name: str, *, method: str, participant: str = "teacher") -> Array:
    """A target feature, gradient-stopped (a frozen teacher already is; a trained one must not be pulled
    towards its student by a distillation term)."""
    return feature_of(inputs, participant, name, method=method, target=True)


def embedding_pair(inputs: LossInputs, student: str, teacher: str, *, method: str) -> tuple[Array, Array]:
    """The student's embedding ``student`` and the teacher's ``teacher`` (gradient-stopped), both ``[B, D]``: a
    method that compares embeddings refuses feature maps with a ``ValueError`` naming both shapes."""
    s = student_feature(inputs, student, method=method)
    t = teacher_feature(inputs, teacher, method=method)
    if s.ndim != 2 or t.ndim != 2:
        raise ValueError(f"{method!r} compares embeddings [B, D], got student {tuple(s.shape)} and teacher "
                         f"{tuple(t.shape)}")
    return s, t


def participant_variables(inputs: LossInputs, participant: str, *, method: str) -> Mapping[str, Any]:
    """``{"params": ..., ...}`` of participant ``participant`` from :attr:`LossInputs.variables` (frozen
    participants' variables are there too, gradient-stopped); the error lists who has variables."""
    variables = inputs.variables.get(participant)
    if variables is None or "params" not in variables:
        raise ValueError(
            f"{method!r} reads participant {participant!r}'s parameters, but the step's inputs hold variables of "
            f"{sorted(inputs.variables)}"
        )
    return variables


def param_at(params: Mapping[str, Any], path: str, *, who: str, method: str) -> Any:
    """``params`` at a ``/``-separated module path (``"fc"``, ``"stage1_block2/bn2"``)."""
    node = params
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            keys = sorted(node) if isinstance(node, Mapping) else []
            raise ValueError(f"{method!r}: {who} has no parameters at {path!r} (no {part!r}; there: {keys})")
        node = node[part]
    return node


def apply_participant(
    inputs: LossInputs, participant: str, x: Any, *, train: bool, method: str, rngs: Mapping[str, Array] | None = None
):
    """Participant ``participant``'s model applied again, to another input ``x`` (a masked, rotated or
    perturbed batch), with this step's variables: a trained participant's are the ones being
    differentiated, a frozen one's are gradient-stopped. The forward's updated BatchNorm statistics are
    returned in ``Outputs.model_state`` and never written back (the step keeps those of the main forward)."""
    p = inputs.participant(participant, method=method)
    variables = inputs.variables.get(participant)
    if variables is None:
        raise ValueError(f"{method!r}: the variables of participant {participant!r} are not available to re-run it")
    return p.model.apply(variables, x, train=train, rngs=rngs)


def dense_layer(inputs: LossInputs, participant: str, path: str, *, method: str) -> dict[str, Array]:
    """Participant ``participant``'s dense layer at ``path`` (``"fc"``) as float32 ``{"kernel", "bias"}``,
    gradient-stopped (a reused classifier is read, never trained through); a missing bias is zeros."""
    params = participant_variables(inputs, participant, method=method)["params"]
    fc = param_at(params, path, who=f"participant {participant!r}", method=method)
    if not isinstance(fc, Mapping) or "kernel" not in fc:
        raise ValueError(f"{method!r}: {participant!r}'s {path!r} is not a dense layer with a 'kernel' (got {type(fc).__name__})")
    kernel = jax.lax.stop_gradient(jnp.asarray(fc["kernel"], jnp.float32))
    bias = fc.get("bias")
    bias = jnp.zeros(kernel.shape[-1], jnp.float32) if bias is None else jax.lax.stop_gradient(jnp.asarray(bias, jnp.float32))
    return {"kernel": kernel, "bias": bias}


def _zeros(x: Any) -> Array:
    """A zero array shaped like ``x`` (an abstract ``ShapeDtypeStruct`` or an array)."""
    return jnp.zeros(jnp.shape(x), getattr(x, "dtype", jnp.float32))


def module_init(module: nn.Module, rng: Array, *features: Any, **kwargs: Any) -> MethodVars:
    """The variables of ``module`` sized from ``features`` (abstract or concrete), as method variables:
    ``params`` trained with the student, every other collection (``batch_stats``) as method state."""
    variables = dict(module.init({"params": rng, "dropout": rng}, *map(_zeros, features), train=False, **kwargs))
    params = variables.pop("params", {})
    variables.pop("intermediates", None)
    return MethodVars(params=params, state=variables)


def module_apply(
    module: nn.Module, vars: MethodVars, *features: Array, train: bool = True, rng: Array | None = None, **kwargs: Any
) -> tuple[Any, Any]:
    """``(module(*features), new state)``: in train mode (the default: losses run in the train step)
    BatchNorm uses the batch's statistics and updates its running averages in the returned state."""
    variables = {"params": vars.params, **vars.state}
    rngs = {} if rng is None else {"dropout": rng}
    if train and vars.state:
        out, updated = module.apply(variables, *features, train=True, rngs=rngs, mutable=list(vars.state), **kwargs)
        return out, {**vars.state, **updated}
    return module.apply(variables, *features, train=train, rngs=rngs, **kwargs), vars.state


def _names(value: str | Sequence[str], what: str) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else tuple(value)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{what} must be a feature name or a non-empty sequence of them, got {value!r}")
    return names


def feature_method(
    name: str,
    loss_fn: Callable[..., Array],
    *,
    student_features: str | Sequence[str],
    teacher_features: str | Sequence[str] | None = None,
    connector: Callable[[tuple[int, ...], tuple[int, ...]], nn.Module] | None = None,
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    pair_weights: Sequence[float] | None = None,
    **hyperparameters: Any,
) -> Method:
    """``Σ_j w_j · loss_fn(connector_j(f_s^j), sg(f_t^j), mask=example_mask, **hyperparameters)`` over
    feature pairs ``j``.

    Args:
      name: the method's name (metrics: ``"<student feature>"`` per pair when there are several).
      loss_fn: a :mod:`jaxkd.losses` function of ``(student feature, teacher feature)``.
      student_features, teacher_features: names (one, or one per pair); the teacher's default to the
        student's.
      connector: ``(student shape, teacher shape) -> Linen module`` applied to the student feature of
        each pair (its own parameters per pair), or ``None``.
      student, teacher: the participants in those roles.
      pair_weights: ``w_j`` (default all 1).
    """
    s_names = _names(student_features, "student_features")
    t_names = s_names if teacher_features is None else _names(teacher_features, "teacher_features")
    if len(s_names) != len(t_names):
        raise ValueError(f"{name}: {len(s_names)} student features {s_names} but {len(t_names)} teacher features {t_names}")
    if student == teacher:
        raise ValueError(f"{name}: the student and the teacher must be different participants, both are {student!r}")
    weights = (1.0,) * len(s_names) if pair_weights is None else tuple(float(w) for w in pair_weights)
    if len(weights) != len(s_names):
        raise ValueError(f"{name}: pair_weights has {len(weights)} entries for {len(s_names)} feature pairs")

    def pairs(inputs: LossInputs):
        for j, (s_name, t_name) in enumerate(zip(s_names, t_names)):
            s = student_feature(inputs, s_name, method=name, participant=student)
            t = teacher_feature(inputs, t_name, method=name, participant=teacher)
            yield str(j), s_name, s, t

    def init(rng: Array, inputs: LossInputs) -> MethodVars:
        if connector is None:
            return MethodVars()
        params, state = {}, {}
        for (key, _, s, t), r in zip(pairs(inputs), jax.random.split(rng, len(s_names))):
            v = module_init(connector(tuple(s.shape), tuple(t.shape)), r, s)
            params[key], state[key] = v.params, v.state
        return MethodVars(params=params, state=state)

    def loss(vars: MethodVars, inputs: LossInputs, rng: Array):
        total = jnp.zeros((), jnp.float32)
        metrics, new_state = {}, {}
        for (key, s_name, s, t), w in zip(pairs(inputs), weights):
            if connector is not None:
                module = connector(tuple(s.shape), tuple(t.shape))
                s, new_state[key] = module_apply(module, MethodVars(vars.params[key], vars.state[key]), s)
            value = jnp.asarray(loss_fn(s, t, mask=inputs.example_mask, **hyperparameters), jnp.float32)
            if len(s_names) > 1:
                metrics[s_name] = value
            total = total + w * value
        return total, LossAux(metrics, new_state if connector is not None else vars.state)

    return Method(name=name, loss=loss, init=init, weight=weight, needs=Needs(participants=(student, teacher)))
