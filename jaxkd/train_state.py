"""The teacher/student train state: one pytree holding everything a step reads or writes.

Like ``flax.training.train_state.TrainState``, the functions (models, optimizer, method) ride along as
static fields, so a step is ``state, batch -> state, metrics`` and Orbax saves exactly the arrays needed
to resume: step, student parameters and model state, the optimizer state, the teacher, the method's
parameters and state, and the PRNG key.

One Optax state covers every trainable leaf — ``{"student": student params, "method": method params}``
— so a connector (FitNets regressor, CRD embedding heads) is stepped by the student's optimizer, as
RepDistiller and mdistiller do, and global-norm clipping sees all trained parameters at once.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxkd.methods.base import LossInputs, Method, MethodVars, as_chain
from jaxkd.models.base import Model, Outputs, split_variables

PyTree = Any


@flax.struct.dataclass
class StudentState:
    params: PyTree
    model_state: PyTree


@flax.struct.dataclass
class TeacherState:
    """A frozen teacher: parameters and model state (batch statistics), no optimizer state."""

    params: PyTree
    model_state: PyTree


class TrainState(flax.struct.PyTreeNode):
    """Step, student, optimizer state, teacher, method variables and PRNG key, in one pytree.

    Attributes:
      step: number of optimizer updates applied (int32).
      student: student parameters and model state.
      opt_state: Optax state over ``{"student": student.params, "method": method.params}``.
      teacher: the teacher's variables, or ``None`` (plain supervised training uses the same state).
      method: the method's variables, keyed by method name (see :func:`jaxkd.methods.chain`).
      rng: the PRNG key the step splits for dropout, augmentation inside losses, sampling.
      student_model, teacher_model, method_def, tx, input_key, num_classes: static.
    """

    step: jax.Array
    student: StudentState
    opt_state: optax.OptState
    teacher: TeacherState | None
    method: MethodVars
    rng: jax.Array
    student_model: Model = flax.struct.field(pytree_node=False)
    teacher_model: Model | None = flax.struct.field(pytree_node=False)
    method_def: Method = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    input_key: str = flax.struct.field(pytree_node=False, default="image")
    num_classes: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def trainable(self) -> dict[str, PyTree]:
        return {"student": self.student.params, "method": self.method.params}

    def teacher_variables(self) -> dict[str, PyTree] | None:
        if self.teacher is None:
            return None
        return {"params": self.teacher.params, **self.teacher.model_state}

    def student_variables(self) -> dict[str, PyTree]:
        return {"params": self.student.params, **self.student.model_state}


def _own(tree: PyTree) -> PyTree:
    """Copies caller arrays: train steps donate the state, which would delete the caller's buffers."""
    return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


def _check_models_agree(student_out: Outputs, teacher_out: Outputs | None) -> None:
    if teacher_out is None:
        return
    s, t = student_out.logits.shape[-1], teacher_out.logits.shape[-1]
    if s != t:
        raise ValueError(
            f"teacher and student must predict the same classes: the student has {s} outputs, "
            f"the teacher has {t}"
        )


def create(
    *,
    student: Model,
    method: Method,
    tx: optax.GradientTransformation,
    sample_batch: Mapping[str, Any],
    rng: jax.Array,
    teacher: Model | None = None,
    teacher_variables: Mapping[str, PyTree] | None = None,
    student_variables: Mapping[str, PyTree] | None = None,
    input_key: str = "image",
) -> TrainState:
    """Initializes the student (unless ``student_variables`` is given), the method and the optimizer.

    The sample batch fixes shapes only: the models and the method's loss are traced once with
    ``jax.eval_shape`` (no compute), so every static error — a missing batch key, a feature the model
    does not sow, teacher and student over different classes — is raised here, before training.

    Args:
      student: the model to train.
      method: a method or chain (a single method is wrapped in a chain of one).
      tx: the Optax transformation for the student and the method's parameters.
      sample_batch: a batch with the shapes training will use (``batch[input_key]`` is the model input).
      rng: PRNG key.
      teacher: the teacher model, or ``None``.
      teacher_variables: the trained teacher's ``{"params": ..., "batch_stats": ...}``; required
        with a teacher (a randomly initialized teacher is almost always a bug). Copied: the state
        owns its buffers, because train steps donate it.
      student_variables: start the student from these (copied) instead of a fresh init.
      input_key: which batch entry feeds the models.
    """
    method = as_chain(method)
    if input_key not in sample_batch:
        raise ValueError(f"sample_batch has no model input {input_key!r}; keys: {sorted(sample_batch)}")
    missing = [k for k in method.batch_keys if k not in sample_batch]
    if missing:
        raise ValueError(f"the method needs batch keys {missing}, the batch has {sorted(sample_batch)}")
    if method.needs_teacher and teacher is None:
        raise ValueError("the method needs a teacher (e.g. kd), but no teacher model was given")
    if teacher is not None and teacher_variables is None:
        raise ValueError("teacher_variables are required with a teacher (load the trained teacher's variables)")

    x = jnp.asarray(sample_batch[input_key])
    rng, student_rng, method_rng = jax.random.split(rng, 3)
    if student_variables is None:
        # Compiled once per model (jit caches on the function): eager init dispatches hundreds of
        # PRNG ops one by one and is several times slower on CPU.
        student_variables = jax.jit(student.init)(student_rng, x)
    else:
        student_variables = _own(student_variables)
    if teacher_variables is not None:
        teacher_variables = _own(teacher_variables)
    params, model_state = split_variables(student_variables)

    def forward(variables, model, train):
        return model.apply(variables, x, train=train, rngs={"dropout": student_rng})

    student_out = jax.eval_shape(lambda v: forward(v, student, True), dict(student_variables))
    teacher_state, teacher_out = None, None
    if teacher is not None:
        t_params, t_model_state = split_variables(teacher_variables)
        teacher_state = TeacherState(params=t_params, model_state=t_model_state)
        teacher_out = jax.eval_shape(lambda v: forward(v, teacher, False), dict(teacher_variables))
    _check_models_agree(student_out, teacher_out)

    batch_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.asarray(a).dtype), dict(sample_batch))
    inputs = LossInputs(
        student=student_out, teacher=teacher_out, batch=batch_spec, step=jnp.zeros((), jnp.int32),
        student_variables=dict(student_variables), student_model=student, input_key=input_key,
    )
    method_vars = method.init(method_rng, inputs)
    # Trace the loss once on abstract values: raises every shape/key/feature error now.
    jax.eval_shape(lambda v, i: method.loss(v, i, method_rng), method_vars, inputs)

    trainable = {"student": params, "method": method_vars.params}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        student=StudentState(params=params, model_state=model_state),
        opt_state=tx.init(trainable),
        teacher=teacher_state,
        method=method_vars,
        rng=rng,
        student_model=student,
        teacher_model=teacher,
        method_def=method,
        tx=tx,
        input_key=input_key,
        num_classes=int(student_out.logits.shape[-1]),
    )
