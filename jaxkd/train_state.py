"""The train state: one pytree over every participant of a distillation, created directly sharded.

Like ``flax.training.train_state.TrainState``, the functions (models, optimizer, method) ride along as
static fields, so a step is ``state, batch -> state, metrics``. The arrays are:

* ``trained`` — each trained participant's parameters and model state (the student, online teachers,
  mutual-learning peers), keyed by participant name;
* ``frozen`` — each frozen participant's variables (teachers). They are not part of a run's checkpoint
  (:meth:`TrainState.run_tree`): a run records the teacher's fingerprint and loads it from its own
  checkpoint;
* ``opt_state`` — one Optax state over ``{<trained participant>: params, ..., "method": method params}``;
* ``method`` — the method's parameters (connectors, heads) and state; ``step``, ``rng``,
  ``skipped_steps``.

One optimizer over all trained leaves, as RepDistiller and mdistiller step a connector with the
student's optimizer: global-norm clipping sees every trained parameter at once and there is one
state to save. A participant with its own ``tx`` (a peer with another learning rate) gets it through
``optax.multi_transform`` over the top-level keys, so the state stays one tree.

With a mesh, :func:`create` computes every array's sharding from the participants' rules first and
builds the state inside ``jax.jit(..., out_shardings=...)``: no array is ever assembled whole on one
device (a teacher too large for one device is loaded shard by shard).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxkd.batch import IMAGE, LABEL, LABELED, MASK
from jaxkd import participants as parts_lib
from jaxkd import sharding as shd
from jaxkd.checks import check_image_scale
from jaxkd.methods.base import LossInputs, Method, MethodVars, Needs, as_chain
from jaxkd.models.base import Model, merge_variables, split_variables
from jaxkd.participants import STUDENT, TEACHER, Participant

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
    """Every participant's variables, the optimizer and method state, the step and the PRNG key.

    Attributes:
      step: number of optimizer updates applied (int32).
      trained: trained participants' :class:`ModelVariables` by name (always holds ``"student"``).
      frozen: frozen participants' :class:`ModelVariables` by name.
      opt_state: Optax state over :attr:`trainable`.
      method_vars: the method's variables (:class:`~jaxkd.methods.MethodVars`: trainable ``params`` and carried
        ``state``), keyed by method name (see :func:`jaxkd.methods.chain`).
      rng: the PRNG key the step splits for dropout and randomness inside losses.
      skipped_steps: updates skipped because the loss or a gradient was not finite (only with
        ``make_train_step(on_nonfinite="skip")``; int32).
      participants: ``((name, Participant), ...)`` without variables (static).
      method: the :class:`~jaxkd.methods.Method` (its functions and what it reads); static, like ``tx``,
        ``label_key``, ``num_classes`` and ``batch_spec``.
    """

    step: jax.Array
    trained: dict[str, ModelVariables]
    frozen: dict[str, ModelVariables]
    opt_state: optax.OptState
    method_vars: MethodVars
    rng: jax.Array
    skipped_steps: jax.Array
    participants: tuple = flax.struct.field(pytree_node=False, default=())
    method: Method = flax.struct.field(pytree_node=False, default=None)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False, default=None)
    label_key: str = flax.struct.field(pytree_node=False, default=LABEL)
    num_classes: int = flax.struct.field(pytree_node=False, default=0)
    batch_spec: BatchSpec = flax.struct.field(pytree_node=False, default=BatchSpec())

    @property
    def method_def(self) -> Method:
        """Former name of :attr:`method` (the method itself; its variables are :attr:`method_vars`)."""
        warnings.warn("TrainState.method_def is deprecated: use TrainState.method (the method's variables are "
                      "TrainState.method_vars)", FutureWarning, stacklevel=2)
        return self.method

    @property
    def trainable(self) -> dict[str, PyTree]:
        """What the optimizer steps: every trained participant's parameters and the method's."""
        return {**{name: v.params for name, v in self.trained.items()}, "method": self.method_vars.params}

    def participant(self, name: str) -> Participant:
        for n, p in self.participants:
            if n == name:
                return p
        raise ValueError(f"the train state has no participant {name!r}; it has {[n for n, _ in self.participants]}")

    def variables_of(self, name: str) -> ModelVariables:
        if name in self.trained:
            return self.trained[name]
        if name in self.frozen:
            return self.frozen[name]
        self.participant(name)  # raises, listing the names
        raise AssertionError(name)

    @property
    def student(self) -> ModelVariables:
        return self.trained[STUDENT]

    @property
    def teacher(self) -> ModelVariables | None:
        """The participant named ``"teacher"`` (frozen or trained), or ``None``."""
        return self.frozen.get(TEACHER, self.trained.get(TEACHER))

    @property
    def student_model(self) -> Model:
        return self.participant(STUDENT).model

    @property
    def teacher_model(self) -> Model | None:
        names = [n for n, _ in self.participants]
        return self.participant(TEACHER).model if TEACHER in names else None

    def run_tree(self) -> dict[str, PyTree]:
        """The arrays a run's checkpoint holds: everything but the frozen participants (saved once, in
        their own checkpoints, and named in the run's by fingerprint)."""
        return {"step": self.step, "trained": self.trained, "opt_state": self.opt_state, "method": self.method_vars,
                "rng": self.rng, "skipped_steps": self.skipped_steps}

    def with_run_tree(self, tree: Mapping[str, PyTree]) -> "TrainState":
        """This state with the arrays of a restored :meth:`run_tree` (whose ``"method"`` entry, named so in
        every checkpoint, holds the method's variables)."""
        tree = dict(tree)
        return self.replace(method_vars=tree.pop("method"), **tree)


def check_variables_match(variables: Mapping[str, PyTree], expected: PyTree, *, who: str,
                          frozen: bool = False) -> None:
    """``variables`` has exactly the tree, shapes and dtypes of ``expected`` (e.g. ``eval_shape(model.init)``).

    Variables of another architecture would otherwise be accepted whenever the parts the model reads
    happen to exist; the error names the first path that differs. A ``frozen`` participant's floating
    leaves may be in another floating dtype (a teacher run in bfloat16: ``participants.cast_params``).
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
        same_dtype = jnp.result_type(g) == jnp.result_type(w) or (
            frozen and all(jnp.issubdtype(jnp.result_type(a), jnp.floating) for a in (g, w)))
        if np.shape(g) != np.shape(w) or not same_dtype:
            raise ValueError(
                f"{who} variables do not match the model at {describe(path)}: got "
                f"{jnp.result_type(g)}{list(np.shape(g))}, the model has {jnp.result_type(w)}{list(np.shape(w))}"
            )


def check_sample_batch(
    batch: Mapping[str, Any], participants: Mapping[str, Participant], *, label_key: str = LABEL
) -> int:
    """A mapping from which every participant's input can be read, with a leading example axis of size
    ``>= 1``; the labels and the ``"mask"`` / ``"labeled"`` flags have the student's number of examples.
    Returns that number.

    Other entries (a method's meta batch, stored top-k) may have their own sizes: the method reads them.
    """
    if not isinstance(batch, Mapping):
        raise ValueError(f"a batch must be a mapping of arrays, got {type(batch).__name__}")
    n = None
    for name, p in participants.items():
        x = p.model_input(batch, name=name)
        size = parts_lib.num_examples(x)
        if size == 0:
            raise ValueError(f"the batch has no examples (participant {name!r}'s input has none)")
        if name == STUDENT:
            n = size
    per_example = [k for k in (label_key, MASK, LABELED) if k in batch]
    different = {k: np.shape(batch[k]) for k in per_example if np.shape(batch[k])[:1] != (n,)}
    if different:
        raise ValueError(f"batch entries disagree on the number of examples: the student's input has {n}, but {different}")
    return n


def gather_participants(
    *,
    student: Model | None,
    student_variables: PyTree | None,
    teacher: Model | None,
    teacher_variables: PyTree | None,
    participants: Mapping[str, Participant] | None,
    input_key: str,
) -> dict[str, Participant]:
    """The ``student=``/``teacher=`` shorthand and the explicit ``participants=`` as one mapping."""
    out: dict[str, Participant] = {}
    if student is not None:
        out[STUDENT] = Participant(student, student_variables, trains=True, input=input_key)
    elif student_variables is not None:
        raise ValueError("student_variables were given without a student model")
    if teacher is not None:
        if teacher_variables is None:
            raise ValueError("teacher_variables are required with a teacher (load the trained teacher's variables)")
        out[TEACHER] = Participant(teacher, teacher_variables, trains=False, input=input_key)
    elif teacher_variables is not None:
        raise ValueError("teacher_variables were given without a teacher model")
    for name, p in dict(participants or {}).items():
        if name in out:
            raise ValueError(f"participant {name!r} was given twice (as {name}= and in participants=)")
        out[name] = p
    parts_lib.check_names(out)
    # Variables as `model.init` and `from_hf` give them carry Flax's logical-axis boxes; the state holds
    # plain arrays (the axis names are read from the model's own abstract init when sharding).
    return {name: p if p.variables is None else dataclasses.replace(p, variables=shd.unbox(p.variables))
            for name, p in out.items()}


def combined_tx(tx: optax.GradientTransformation, parts: Mapping[str, Participant]) -> optax.GradientTransformation:
    """``tx`` for every trained leaf, except participants that bring their own (``optax.multi_transform``
    over the top-level keys of :attr:`TrainState.trainable`; the method's parameters follow ``tx``) and the
    leaves a participant's ``trainable`` leaves out (``optax.set_to_zero``: a zero update and no optimizer
    state, so a LoRA base model costs no Adam moments)."""
    own = {name: p.tx for name, p in parts.items() if p.trains and p.tx is not None}
    partial = {name: p for name, p in parts.items() if p.trains and p.trainable is not None}
    if not own and not partial:
        return tx
    default, frozen = "__default__", "__frozen__"

    def labels(trainable):
        out = {}
        for key, sub in trainable.items():
            label = key if key in own else default
            mask = partial[key].trainable_mask(sub) if key in partial else jax.tree.map(lambda _: True, sub)
            out[key] = jax.tree.map(lambda keep, label=label: label if keep else frozen, mask)
        return out

    return optax.multi_transform({default: tx, **own, **({frozen: optax.set_to_zero()} if partial else {})}, labels)


def check_trainable(name: str, participant: Participant, params: PyTree) -> None:
    """A participant's ``trainable`` selects at least one of its parameters (else nothing would train); the
    error lists the parameter paths."""
    if participant.trainable is None:
        return
    mask = participant.trainable_mask(params)
    if not any(jax.tree.leaves(mask)):
        paths = [parts_lib.param_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
        raise ValueError(f"participant {name!r}: trainable={participant.trainable!r} matches none of its parameters; "
                         f"their paths are: {paths}")


def _abstract_batch(batch: Mapping[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct(np.shape(v), jnp.result_type(v)) for k, v in batch.items()}


def create(
    *,
    method: Method,
    tx: optax.GradientTransformation,
    sample_batch: Mapping[str, Any],
    rng: jax.Array,
    student: Model | None = None,
    teacher: Model | None = None,
    teacher_variables: Mapping[str, PyTree] | None = None,
    student_variables: Mapping[str, PyTree] | None = None,
    participants: Mapping[str, Participant] | None = None,
    input_key: str = IMAGE,
    label_key: str = LABEL,
    mesh: Mesh | None = None,
) -> TrainState:
    """Initializes the trained participants (unless given variables), the method and the optimizer.

    The sample batch fixes shapes only: the models and the method's loss are traced once with
    ``jax.eval_shape`` (no compute), so every static error — a missing batch key, a feature the model
    does not sow, models over different classes, variables of another architecture, a participant the
    method asks for that the state lacks — is raised here, before training.

    The steps, each its own function: :func:`gather_participants`; :func:`plan` (the checks, and every
    participant's abstract variables and outputs); :func:`variable_shardings`; :func:`init` (the arrays,
    built where they belong); :func:`check_loss` (the loss traced once); :func:`place` (committed to their
    devices, as a :class:`TrainState`).

    Args:
      method: a method or chain (a single method is wrapped in a chain of one).
      tx: the Optax transformation for every trained participant (unless it has its own) and the
        method's parameters.
      sample_batch: a batch with the shapes training will use.
      rng: PRNG key.
      student: the student model (shorthand for ``participants={"student": jaxkd.student(model)}``).
      teacher: a frozen teacher (shorthand for ``participants={"teacher": jaxkd.teacher(model, vars)}``).
      teacher_variables: the trained teacher's ``{"params": ..., "batch_stats": ...}``; required with a
        teacher and checked to be exactly the teacher model's variables.
      student_variables: start the student from these (checked like the teacher's).
      participants: further (or all) participants by name: teachers, peers, online teachers
        (:class:`jaxkd.Participant`); one must be ``"student"``.
      input_key: the batch entry the ``student=``/``teacher=`` shorthands read.
      label_key: which batch entry holds the integer labels (every method and the step's accuracy read
        this one key; semi-supervised batches add a boolean ``"labeled"`` entry).
      mesh: build the state sharded over this mesh (:func:`jaxkd.sharding.make_mesh`): each participant's
        parameters (and their optimizer state) by its ``rules`` or the mesh default. Given variables are
        copied shard by shard; nothing is assembled on one device. ``None``: the default device.

    Returns the state; it owns its buffers (given variables are copied: train steps donate the state).
    """
    parts = gather_participants(student=student, student_variables=student_variables, teacher=teacher,
                                teacher_variables=teacher_variables, participants=participants, input_key=input_key)
    planned = plan(method, parts, sample_batch, tx=tx, rng=rng, label_key=label_key)
    var_shardings = variable_shardings(planned, mesh)
    trained, method_vars, opt_state, frozen = init(planned, var_shardings, mesh)
    check_loss(planned, trained, method_vars, frozen)
    return place(planned, trained, method_vars, opt_state, frozen, mesh)


def check_needs(needs: Needs, parts: Mapping[str, Participant], sample_batch: Mapping[str, Any], *,
                label_key: str = LABEL) -> None:
    """The method's :class:`~jaxkd.methods.base.Needs` against the participants and the sample batch: every batch
    entry it reads (the labels under ``label_key`` when it reads labels), every participant it reads, each
    one it trains created trainable. The errors name what is missing and list what there is."""
    needed = ([label_key] if needs.labels else []) + list(needs.batch_keys)
    missing = [k for k in needed if k not in sample_batch]
    if missing:
        raise ValueError(f"the method needs batch keys {missing}, the batch has {sorted(sample_batch)}")
    if needs.teacher and TEACHER not in parts:
        raise ValueError(
            f"the method needs a teacher (e.g. kd): a participant named 'teacher', but the participants are "
            f"{sorted(parts)}"
        )
    for name in needs.participants:
        if name not in parts:
            raise ValueError(f"the method reads participant {name!r}, but the train state has participants {sorted(parts)}")
    for name in needs.trained:
        if not parts[name].trains:
            raise ValueError(
                f"the method trains participant {name!r} (e.g. a mutual-learning peer or an online teacher), but it "
                "is frozen: give it trains=True"
            )


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :func:`create` builds, known before any variable exists (from :func:`plan`).

    Attributes:
      method: the method as a chain.
      parts: the participants by name, with their given variables.
      tx: the optimizer over :attr:`TrainState.trainable` (:func:`combined_tx`).
      batch: the sample batch as device arrays.
      abstract_batch: its shapes and dtypes.
      boxed: each participant's abstract variables as its model declares them (logical-axis boxes kept,
        for shardings).
      abstract_vars: each participant's abstract variables (plain shapes and dtypes).
      outputs: each participant's abstract outputs on the sample batch (in train mode when it trains).
      num_classes: the student's number of outputs.
      label_key: the batch entry of the labels.
      batch_spec: what every batch must look like.
      rng: the state's PRNG key.
      init_rngs: each participant's initialization key.
      method_rng: the key of the method's ``init`` (and of the loss traced at creation).
    """

    method: Method
    parts: dict[str, Participant]
    tx: optax.GradientTransformation
    batch: dict[str, jax.Array]
    abstract_batch: dict[str, jax.ShapeDtypeStruct]
    boxed: dict[str, PyTree]
    abstract_vars: dict[str, PyTree]
    outputs: dict[str, Any]
    num_classes: int
    label_key: str
    batch_spec: BatchSpec
    rng: jax.Array
    init_rngs: dict[str, jax.Array]
    method_rng: jax.Array

    @property
    def static(self) -> tuple:
        """``((name, Participant), ...)`` without variables, as the state holds them."""
        return tuple((name, p.static()) for name, p in self.parts.items())

    @property
    def trained_names(self) -> list[str]:
        return [n for n, p in self.parts.items() if p.trains]

    @property
    def frozen_names(self) -> list[str]:
        return [n for n, p in self.parts.items() if not p.trains]

    def loss_inputs(self, variables: Mapping[str, PyTree], outputs: Mapping[str, Any] | None = None,
                    batch: Mapping[str, Any] | None = None) -> LossInputs:
        """The method's inputs at step 0 over ``variables`` (by participant name); by default the abstract
        outputs and batch."""
        return LossInputs(outputs=self.outputs if outputs is None else outputs,
                          batch=self.abstract_batch if batch is None else batch, step=jnp.zeros((), jnp.int32),
                          variables=variables, participants=self.static, label_key=self.label_key)


def plan(
    method: Method,
    parts: Mapping[str, Participant],
    sample_batch: Mapping[str, Any],
    *,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    label_key: str = LABEL,
) -> Plan:
    """The first step of :func:`create`: checks the sample batch against the participants (their inputs, the
    image scale), the method's :class:`~jaxkd.methods.base.Needs` against both (:func:`check_needs`), and traces
    every participant's variables and outputs with ``jax.eval_shape`` (no compute): given variables must be
    exactly the model's, and every participant predicts the student's classes unless the method relates
    vocabularies itself (``Needs.cross_vocabulary``)."""
    method = as_chain(method)
    parts = dict(parts)
    check_sample_batch(sample_batch, parts, label_key=label_key)
    for name, p in parts.items():  # values, so here on the host: inside the models' trace only dtypes show
        for path, leaf in jax.tree_util.tree_leaves_with_path(p.model_input(sample_batch, name=name)):
            key = p.input if isinstance(p.input, str) else jax.tree_util.keystr(path, simple=True, separator="/")
            check_image_scale(f"participant {name!r}: batch[{key!r}]" if key else f"participant {name!r}'s input", leaf)
    check_needs(method.needs, parts, sample_batch, label_key=label_key)

    batch = {k: jnp.asarray(v) for k, v in sample_batch.items()}
    rng, init_rng, method_rng, dropout_rng = jax.random.split(rng, 4)
    init_rngs = dict(zip(parts, jax.random.split(init_rng, len(parts))))

    # Shapes first: every participant's variables (boxed when a model declares logical axes) and outputs.
    boxed, abstract_vars, outputs = {}, {}, {}
    for name, p in parts.items():
        x = p.model_input(batch, name=name)
        boxed[name] = jax.eval_shape(p.model.init, init_rngs[name], x)
        abstract_vars[name] = shd.unbox(boxed[name])
        if p.variables is not None:
            check_variables_match(p.variables, abstract_vars[name], who=name, frozen=not p.trains)
        check_trainable(name, p, abstract_vars[name]["params"])
        outputs[name] = jax.eval_shape(
            lambda v, x, p=p: p.model.apply(v, x, train=p.trains, rngs={"dropout": dropout_rng}), abstract_vars[name], x
        )
    num_classes = int(outputs[STUDENT].logits.shape[-1])
    for name, out in outputs.items():
        if name != STUDENT and out.logits.shape[-1] != num_classes and not method.needs.cross_vocabulary:
            raise ValueError(
                f"participant {name!r} and the student must predict the same classes: the student has "
                f"{num_classes} outputs, {name!r} has {out.logits.shape[-1]}. A language model whose "
                f"embedding is padded past its tokenizer's vocabulary is cut explicitly with "
                f"jaxkd.models.vocab.truncate_vocab(model, size); models with different tokenizers need a "
                f"cross-tokenizer method (alm)"
            )
    return Plan(method=method, parts=parts, tx=combined_tx(tx, parts), batch=batch,
                abstract_batch=_abstract_batch(sample_batch), boxed=boxed, abstract_vars=abstract_vars,
                outputs=outputs, num_classes=num_classes, label_key=label_key,
                batch_spec=BatchSpec.of(sample_batch), rng=rng, init_rngs=init_rngs, method_rng=method_rng)


def variable_shardings(planned: Plan, mesh: Mesh | None) -> dict[str, PyTree]:
    """Each participant's variable shardings over ``mesh``, by its ``rules`` or the mesh default (and the
    logical axes its model declares); ``None`` per participant without a mesh (the default device)."""
    if mesh is None:
        return {name: None for name in planned.parts}
    return {
        name: shd.boxed_shardings(planned.boxed[name], mesh, p.rules)
        for name, p in planned.parts.items()
    }


def init(planned: Plan, var_shardings: Mapping[str, PyTree], mesh: Mesh | None) -> tuple[PyTree, ...]:
    """The arrays of the state, each written where ``var_shardings`` puts it: ``(trained, method_vars,
    opt_state, frozen)`` — the trained participants' variables (copies of given ones, the others from their
    model's ``init``), the method's variables from its ``init`` over the abstract outputs, the optimizer
    state, and copies of the frozen participants' variables. The state owns every buffer (train steps
    donate it; the caller's arrays must survive)."""
    parts, method, trained_names = planned.parts, planned.method, planned.trained_names

    def build(rng_method, variables, frozen):
        method_vars = method.init(rng_method, planned.loss_inputs({**frozen, **variables}))
        trained = {name: ModelVariables(*split_variables(variables[name])) for name in trained_names}
        trainable = {**{n: v.params for n, v in trained.items()}, "method": method_vars.params}
        return trained, method_vars, planned.tx.init(trainable)

    given = {n: parts[n].variables for n in trained_names if parts[n].variables is not None}
    frozen_vars = {n: parts[n].variables for n in planned.frozen_names}
    # Copies: the state owns its buffers (steps donate it; the caller's arrays must survive).
    variables = _owned_copy(given, {n: var_shardings[n] for n in given} if mesh is not None else None)
    frozen_vars = _owned_copy(frozen_vars, {n: var_shardings[n] for n in frozen_vars} if mesh is not None else None)
    for name in trained_names:
        if name not in variables:
            # One compiled init per model (cached across states), writing each shard where it belongs.
            x = parts[name].model_input(planned.batch, name=name)
            model_init = _unboxed_init(parts[name].model)
            if mesh is not None:
                model_init = jax.jit(model_init.__wrapped__, out_shardings=var_shardings[name])
            variables[name] = model_init(planned.init_rngs[name], x)
    if mesh is None:
        trained, method_vars, opt_state = jax.jit(build, donate_argnums=(1,))(planned.method_rng, variables, frozen_vars)
    else:
        out_abstract = jax.eval_shape(build, planned.method_rng, variables, frozen_vars)
        out_shardings = _state_shardings(out_abstract, var_shardings, planned.tx, mesh, parts)
        trained, method_vars, opt_state = jax.jit(build, donate_argnums=(1,), out_shardings=out_shardings)(
            planned.method_rng, variables, frozen_vars
        )
    return trained, method_vars, opt_state, frozen_vars


def check_loss(planned: Plan, trained: Mapping[str, ModelVariables], method_vars: MethodVars,
               frozen: Mapping[str, PyTree]) -> None:
    """Traces the method's loss once on abstract values (``jax.eval_shape``, no compute): raises every
    shape, batch key, feature and participant error of the loss now, before training. A batch transform
    (``Method.prepare``) is traced first, so its errors and the entries it adds are checked too."""
    def trace_loss(method_vars, outputs, batch, trained, frozen):
        if planned.method.prepare is not None:
            batch = planned.method.prepare(method_vars, batch, planned.method_rng)
        variables = {**frozen, **{n: v.variables() for n, v in trained.items()}}
        return planned.method.loss(method_vars, planned.loss_inputs(variables, outputs, batch), planned.method_rng)

    jax.eval_shape(trace_loss, method_vars, planned.outputs, planned.abstract_batch, trained, frozen)


def place(planned: Plan, trained: Mapping[str, ModelVariables], method_vars: MethodVars, opt_state: PyTree,
          frozen: Mapping[str, PyTree], mesh: Mesh | None) -> TrainState:
    """The :class:`TrainState` of the initialized arrays, every array committed to its device(s): on the
    default device without a mesh, the step counters and PRNG key replicated over a mesh. (A mix of
    committed and uncommitted arrays would compile the train step twice: the first step's outputs are all
    committed.)"""
    replicate = (lambda a: jax.device_put(a, jax.devices()[0])) if mesh is None else (
        lambda a: jax.device_put(a, shd.replicated(mesh)))
    if mesh is None:
        trained, method_vars, opt_state, frozen = jax.device_put(
            (trained, method_vars, opt_state, frozen), jax.devices()[0])
    return TrainState(
        step=replicate(jnp.zeros((), jnp.int32)),
        trained=trained,
        frozen={n: ModelVariables(*split_variables(v)) for n, v in frozen.items()},
        opt_state=opt_state,
        method_vars=method_vars,
        rng=replicate(planned.rng),
        skipped_steps=replicate(jnp.zeros((), jnp.int32)),
        participants=planned.static,
        method=planned.method,
        tx=planned.tx,
        label_key=planned.label_key,
        num_classes=planned.num_classes,
        batch_spec=planned.batch_spec,
    )


@functools.cache
def _unboxed_init(model: Model):
    """``model.init`` returning plain arrays (logical-axis boxes removed); one function per model, so its
    compiled init is reused by every state built from that model."""
    def init(rng, x):
        return shd.unbox(model.init(rng, x))

    jitted = jax.jit(init)
    jitted.__wrapped__ = init
    return jitted


def _owned_copy(tree: PyTree, shardings: PyTree | None = None) -> PyTree:
    """Fresh buffers for ``tree`` (placed by ``shardings``): the state owns its buffers, because steps donate
    it and the caller's arrays must survive. Host arrays are transferred shard by shard
    (``device_put``); device arrays are copied by a jitted identity into the target layout, which never
    gathers a sharded array onto one device (``device_put`` may alias a source buffer even with
    ``may_alias=False`` when it replicates onto devices that include the source's)."""
    leaves, treedef = jax.tree.flatten(tree)
    targets = [None] * len(leaves) if shardings is None else treedef.flatten_up_to(shardings)
    on_device = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array)]
    out = [leaf if isinstance(leaf, jax.Array) else jax.device_put(np.asarray(leaf), target)
           for leaf, target in zip(leaves, targets)]
    if on_device:
        copy = jax.jit(lambda xs: [jnp.copy(x) for x in xs], out_shardings=[targets[i] for i in on_device])
        for i, copied in zip(on_device, copy([leaves[i] for i in on_device])):
            out[i] = copied
    return jax.tree.unflatten(treedef, out)


def _state_shardings(out_abstract, var_shardings, tx, mesh: Mesh, parts) -> PyTree:
    """Shardings of ``(trained, method vars, opt state)``: participants' variables by their rules, the
    optimizer state like the parameters it tracks (``optax.tree_map_params``), the method's variables by
    the mesh default (connectors are small; a big one is sharded over fsdp like any parameter)."""
    trained_abstract, method_abstract, opt_abstract = out_abstract
    default = shd.default_rules(mesh)
    trained = {
        name: ModelVariables(*split_variables(var_shardings[name])) for name in trained_abstract
    }
    method = shd.param_shardings(method_abstract, mesh, default)
    trainable = {**{n: v.params for n, v in trained.items()}, "method": method.params}
    if any(p.trains and (p.tx is not None or p.trainable is not None) for p in parts.values()):
        # optax.tree_map_params initializes the optimizer on a placeholder, which a multi_transform labelling
        # the parameters by name cannot label: its states are matched to the parameters by path instead.
        abstract_trainable = {**{n: v.params for n, v in trained_abstract.items()}, "method": method_abstract.params}
        return trained, method, _shardings_by_param_path(opt_abstract, trainable, abstract_trainable, mesh, default)
    opt = optax.tree_map_params(
        tx, lambda _, sharding: sharding, opt_abstract, trainable,
        transform_non_params=lambda leaf: shd.param_shardings(leaf, mesh, default),
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )
    return trained, method, opt


def _shardings_by_param_path(opt_abstract, trainable_shardings, abstract_trainable, mesh: Mesh, default) -> PyTree:
    """Each optimizer-state leaf whose path ends with a parameter's path (``…mu['student']['block_0']…``) and
    that has its shape gets the parameter's sharding; the others (step counts) the mesh default."""
    def keys(path):
        return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)

    is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)
    shardings = {keys(p): s for p, s in jax.tree_util.tree_flatten_with_path(trainable_shardings, is_leaf=is_sharding)[0]}
    shapes = {keys(p): np.shape(a) for p, a in jax.tree_util.tree_flatten_with_path(abstract_trainable)[0]}

    def pick(path, leaf):
        path = keys(path)
        for start in range(len(path)):
            tail = path[start:]
            if tail in shardings and shapes[tail] == np.shape(leaf):
                return shardings[tail]
        return shd.param_shardings(leaf, mesh, default)

    return jax.tree_util.tree_map_with_path(pick, opt_abstract)
