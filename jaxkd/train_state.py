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
import numpy as np
import optax

from jaxkd.methods.base import LABELED_KEY, MASK_KEY, LossInputs, Method, MethodVars, as_chain
from jaxkd.models.base import Model, merge_variables, split_variables

PyTree = Any


@flax.struct.dataclass
class ModelVariables:
    """A model's parameters and model state (batch statistics …), as the train state holds them."""

    params: PyTree
    model_state: PyTree

    def variables(self) -> dict[str, PyTree]:
        """``{"params": ..., **model_state}``, the form ``Model.apply`` takes."""
        return merge_variables(self.params, self.model_state)


@flax.struct.dataclass
class BatchSpec:
    """What every batch must look like: per key, the shape of one example and the dtype kind (from the
    sample batch the state was created with). Checked on the host before each step."""

    examples: tuple[tuple[str, tuple[int, ...], str], ...] = ()

    @classmethod
    def of(cls, batch: Mapping[str, Any]) -> "BatchSpec":
        return cls(tuple((k, tuple(np.shape(v)[1:]), jnp.result_type(v).kind) for k, v in sorted(batch.items())))


class TrainState(flax.struct.PyTreeNode):
    """Step, student, optimizer state, teacher, method variables and PRNG key, in one pytree.

    Attributes:
      step: number of optimizer updates applied (int32).
      student: student parameters and model state.
      opt_state: Optax state over ``{"student": student.params, "method": method.params}``.
      teacher: the teacher's variables, or ``None`` (plain supervised training uses the same state).
      method: the method's variables, keyed by method name (see :func:`jaxkd.methods.chain`).
      rng: the PRNG key the step splits for dropout, augmentation inside losses, sampling.
      skipped_steps: updates skipped because the loss or a gradient was not finite (only with
        ``make_train_step(on_nonfinite="skip")``; int32).
      student_model, teacher_model, method_def, tx, input_key, label_key, num_classes, batch_spec: static.
    """

    step: jax.Array
    student: ModelVariables
    opt_state: optax.OptState
    teacher: ModelVariables | None
    method: MethodVars
    rng: jax.Array
    skipped_steps: jax.Array
    student_model: Model = flax.struct.field(pytree_node=False)
    teacher_model: Model | None = flax.struct.field(pytree_node=False)
    method_def: Method = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    input_key: str = flax.struct.field(pytree_node=False, default="image")
    label_key: str = flax.struct.field(pytree_node=False, default="label")
    num_classes: int = flax.struct.field(pytree_node=False, default=0)
    batch_spec: BatchSpec = flax.struct.field(pytree_node=False, default=BatchSpec())

    @property
    def trainable(self) -> dict[str, PyTree]:
        return {"student": self.student.params, "method": self.method.params}


def _own(tree: PyTree) -> PyTree:
    """Copies caller arrays: train steps donate the state, which would delete the caller's buffers."""
    return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


def check_variables_match(variables: Mapping[str, PyTree], expected: PyTree, *, who: str) -> None:
    """``variables`` has exactly the tree, shapes and dtypes of ``expected`` (e.g. ``eval_shape(model.init)``).

    Variables of another architecture would otherwise be accepted whenever the parts the model reads
    happen to exist; the error names the first path that differs.
    """
    got = dict(jax.tree_util.tree_flatten_with_path(dict(variables))[0])
    want = dict(jax.tree_util.tree_flatten_with_path(dict(expected))[0])
    describe = jax.tree_util.keystr
    for path in sorted(set(got) | set(want), key=describe):
        if path not in got:
            raise ValueError(f"{who} variables do not match the model: missing {describe(path)}")
        if path not in want:
            raise ValueError(f"{who} variables do not match the model: unexpected {describe(path)}")
        g, w = got[path], want[path]
        if np.shape(g) != np.shape(w) or jnp.result_type(g) != jnp.result_type(w):
            raise ValueError(
                f"{who} variables do not match the model at {describe(path)}: got "
                f"{jnp.result_type(g)}{list(np.shape(g))}, the model has {jnp.result_type(w)}{list(np.shape(w))}"
            )


def check_sample_batch(batch: Mapping[str, Any], *, input_key: str, label_key: str = "label") -> int:
    """A mapping whose model input has a leading example axis of size ``>= 1``; the labels and the
    ``"mask"`` / ``"labeled"`` flags have the same number of examples. Returns that number.

    Other entries (a method's meta batch, stored top-k) may have their own sizes: the method reads them.
    """
    if not isinstance(batch, Mapping):
        raise ValueError(f"a batch must be a mapping of arrays, got {type(batch).__name__}")
    if input_key not in batch:
        raise ValueError(f"the batch has no model input {input_key!r}; its keys are {sorted(batch)}")
    shape = np.shape(batch[input_key])
    if len(shape) == 0 or shape[0] == 0:
        raise ValueError(f"the batch has no examples (batch[{input_key!r}] has shape {shape})")
    per_example = [k for k in (label_key, MASK_KEY, LABELED_KEY) if k in batch]
    different = {k: np.shape(batch[k]) for k in per_example if np.shape(batch[k])[:1] != shape[:1]}
    if different:
        raise ValueError(
            f"batch entries disagree on the number of examples: {input_key!r} has {shape[0]}, but {different}"
        )
    return shape[0]


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
    label_key: str = "label",
) -> TrainState:
    """Initializes the student (unless ``student_variables`` is given), the method and the optimizer.

    The sample batch fixes shapes only: the models and the method's loss are traced once with
    ``jax.eval_shape`` (no compute), so every static error — a missing batch key, a feature the model
    does not sow, teacher and student over different classes, variables of another architecture — is
    raised here, before training.

    Args:
      student: the model to train.
      method: a method or chain (a single method is wrapped in a chain of one).
      tx: the Optax transformation for the student and the method's parameters.
      sample_batch: a batch with the shapes training will use (``batch[input_key]`` is the model input).
      rng: PRNG key.
      teacher: the teacher model, or ``None``.
      teacher_variables: the trained teacher's ``{"params": ..., "batch_stats": ...}``; required with a
        teacher (a randomly initialized teacher is almost always a bug) and checked to be exactly the
        teacher model's variables. Copied: the state owns its buffers, because train steps donate it.
      student_variables: start the student from these (copied, checked like the teacher's) instead of
        a fresh init.
      input_key: which batch entry feeds the models.
      label_key: which batch entry holds the integer labels (every method and the step's accuracy read
        this one key; semi-supervised batches add a boolean ``"labeled"`` entry).
    """
    method = as_chain(method)
    check_sample_batch(sample_batch, input_key=input_key, label_key=label_key)
    needed = ([label_key] if method.needs_labels else []) + list(method.batch_keys)
    missing = [k for k in needed if k not in sample_batch]
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
        check_variables_match(student_variables, jax.eval_shape(student.init, student_rng, x), who="student")
        student_variables = _own(student_variables)
    params, model_state = split_variables(student_variables)

    def forward(model, variables, train):
        return model.apply(variables, x, train=train, rngs={"dropout": student_rng})

    student_out = jax.eval_shape(lambda v: forward(student, v, True), dict(student_variables))
    teacher_state, teacher_out = None, None
    if teacher is not None:
        check_variables_match(teacher_variables, jax.eval_shape(teacher.init, student_rng, x), who="teacher")
        teacher_state = ModelVariables(*split_variables(_own(teacher_variables)))
        teacher_out = jax.eval_shape(lambda v: forward(teacher, v, False), teacher_state.variables())
        s, t = student_out.logits.shape[-1], teacher_out.logits.shape[-1]
        if s != t:
            raise ValueError(
                f"teacher and student must predict the same classes: the student has {s} outputs, "
                f"the teacher has {t}"
            )

    batch_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), dict(sample_batch))
    inputs = LossInputs(
        student=student_out, teacher=teacher_out, batch=batch_spec, step=jnp.zeros((), jnp.int32),
        student_variables=dict(student_variables), student_model=student, input_key=input_key, label_key=label_key,
    )
    method_vars = method.init(method_rng, inputs)
    # Trace the loss once on abstract values: raises every shape/key/feature error now.
    jax.eval_shape(lambda v, i: method.loss(v, i, method_rng), method_vars, inputs)

    trainable = {"student": params, "method": method_vars.params}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        student=ModelVariables(params=params, model_state=model_state),
        opt_state=tx.init(trainable),
        teacher=teacher_state,
        method=method_vars,
        rng=rng,
        skipped_steps=jnp.zeros((), jnp.int32),
        student_model=student,
        teacher_model=teacher,
        method_def=method,
        tx=tx,
        input_key=input_key,
        label_key=label_key,
        num_classes=int(student_out.logits.shape[-1]),
        batch_spec=BatchSpec.of(sample_batch),
    )
