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
* ``prepare(vars, batch, rng) -> batch`` (optional) — a transform of the training batch that *every*
  participant sees (mixup, CutMix, an inception crop): the train step applies it inside the compiled
  program before any forward pass, frozen teachers included, and never at evaluation. It is not
  differentiated. A chain applies its members' transforms in order.

and one record of what it needs, :class:`Needs` (``method.needs``):

* ``participants`` — every participant whose outputs the loss reads besides the student (``"teacher"``,
  a peer, more teachers), the trained ones included; ``trained`` — those it trains (a mutual-learning
  peer, an online teacher, the participant in its ``student`` role);
* ``labels`` — whether it reads ``batch[label_key]``; ``batch_keys`` — the other batch entries it reads;
* ``meta_prefix`` — for a held-out meta objective (TGeo-KD), the prefix of the meta batch's keys;
* ``cross_vocabulary`` — whether it relates outputs over different vocabularies itself (ALM).

:func:`jaxkd.create` checks the record against the participants and the sample batch (the errors name what
is missing), and experiments read it to decide which participants to build and what the batches carry.
Nothing is assumed: a method that reads the teacher names it (``Needs(participants=("teacher",))``).

:func:`chain` (or ``+``) composes methods: each keeps its variables under its own name, the total is the
weighted sum, and every term is reported as a metric. A weight is a finite number ``>= 0`` or a schedule
``step -> weight`` (as optax schedules are); ``w * method`` multiplies whatever weight the method already
has (a warm-up schedule stays a warm-up), and ``w * (a + b)`` weights every member. A chain needs what its
members need together (:meth:`Needs.merge`).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Sequence, Union

import flax.struct
import jax
import jax.numpy as jnp

from jaxkd.batch import IMAGE, LABEL, LABELED, MASK
from jaxkd.checks import check_nonnegative
from jaxkd.losses.core import combine_masks
from jaxkd.models.base import Outputs
from jaxkd.participants import STUDENT, TEACHER, Participant

Array = jax.Array
PyTree = Any
Weight = Union[float, Callable[[Array], Array]]

#: Metric names the train step writes itself; no method may be named like them.
RESERVED_NAMES = ("loss", "grad_norm", "accuracy", "skipped")


@flax.struct.dataclass
class LossInputs:
    """Everything a method's loss may look at in one step.

    Attributes:
      outputs: every participant's forward pass by name (see :mod:`jaxkd.participants`): trained ones in
        train mode, differentiated; frozen ones in eval mode, run outside ``jax.value_and_grad`` under
        ``stop_gradient``. Methods read them through two accessors only: :meth:`output` for the
        outputs a term trains (the ``student`` role, differentiated) and :meth:`target` for a participant
        learned *from* (the ``teacher`` role, always gradient-stopped: a trained peer or online teacher
        must not be pulled towards the model it teaches).
      batch: the batch mapping (model inputs, labels, ``"mask"`` of valid examples, ``"labeled"`` …).
      step: the optimizer step count before this update (int32 scalar).
      variables: ``{"params": ..., **model_state}`` of every participant: the trained ones *being
        differentiated* — for methods that run a model again (a frozen copy, a one-step lookahead) — and
        the frozen ones under ``stop_gradient`` (a reused teacher classifier, a teacher's BatchNorm
        statistics). At ``init`` these are the initial variables.
      participants: ``((name, Participant), ...)`` without their variables (static).
      label_key: which batch entry holds the integer labels (static; one convention for every method,
        set when the train state is created).
    """

    outputs: Mapping[str, Outputs]
    batch: Mapping[str, Array]
    step: Array
    variables: Mapping[str, PyTree] = flax.struct.field(default_factory=dict)
    participants: tuple = flax.struct.field(pytree_node=False, default=())
    label_key: str = flax.struct.field(pytree_node=False, default=LABEL)

    @classmethod
    def of(
        cls,
        student: Outputs,
        teacher: Outputs | None = None,
        batch: Mapping[str, Array] | None = None,
        step: Array | int = 0,
        *,
        student_variables: PyTree = None,
        student_model: Any = None,
        input_key: str = IMAGE,
        label_key: str = LABEL,
        **others: Outputs,
    ) -> "LossInputs":
        """The inputs of a one-student, one-teacher step (tests, notebooks): ``others`` adds participants."""
        outputs = {"student": student, **({} if teacher is None else {"teacher": teacher}), **others}
        participants = ()
        if student_model is not None:
            participants = (("student", Participant(student_model, input=input_key)),)
        variables = {} if student_variables is None else {"student": student_variables}
        return cls(outputs=outputs, batch={} if batch is None else batch, step=jnp.asarray(step, jnp.int32),
                   variables=variables, participants=participants, label_key=label_key)

    def output(self, name: str, *, method: str = "a method") -> Outputs:
        """Participant ``name``'s outputs as its forward pass produced them: differentiated when it is
        trained. For the outputs a term *trains* (the ``student`` role); read a participant that is learned
        from with :meth:`target`. The error lists the participants the state has."""
        try:
            return self.outputs[name]
        except KeyError:
            raise ValueError(
                f"{method!r} needs the outputs of participant {name!r}, but the train state has participants "
                f"{sorted(self.outputs)}"
            ) from None

    def target(self, name: str, *, method: str = "a method") -> Outputs:
        """Participant ``name``'s outputs (logits and features) as a distillation target: gradient-stopped.

        A frozen teacher already is (stopping it again costs nothing); a *trained* one — a mutual-learning
        peer, an online teacher, the student teaching a peer (``kd(student="peer", teacher="student")``) —
        learns from its own terms, never by moving towards the model it teaches. The error lists the
        participants the state has."""
        return jax.lax.stop_gradient(self.output(name, method=method))

    def participant(self, name: str, *, method: str = "a method") -> Any:
        for n, p in self.participants:
            if n == name:
                return p
        raise ValueError(
            f"{method!r} needs participant {name!r}, but the train state has {[n for n, _ in self.participants]}"
        )

    @property
    def student_model(self) -> Any:
        """The student :class:`~jaxkd.models.Model` (static)."""
        return self.participant("student", method="the student model").model

    @property
    def student_variables(self) -> PyTree:
        return self.variables.get("student")

    @property
    def model_input(self) -> Array:
        """What the student model is applied to in this batch."""
        return self.participant("student").model_input(self.batch, name="student")

    def model_input_of(self, batch: Mapping[str, Array], name: str = "student") -> Any:
        """What participant ``name``'s model is applied to for another ``batch`` (e.g. a meta batch)."""
        return self.participant(name).model_input(batch, name=name)

    @property
    def example_mask(self) -> Array | None:
        """Which examples are real (``batch["mask"]``), or ``None`` when all are."""
        return self.batch.get(MASK)

    @property
    def labeled(self) -> Array | None:
        """Which examples carry a label (``batch["labeled"]``), or ``None`` when all do."""
        return self.batch.get(LABELED)

    @property
    def label_mask(self) -> Array | None:
        """Which examples are real *and* labeled (``batch["mask"] & batch["labeled"]``), or ``None``."""
        return combine_masks(self.example_mask, self.labeled)

    def labels(self, method: str) -> Array:
        """``batch[label_key]``, with the labels of unlabeled examples replaced by 0.

        Unlabeled examples may carry any integer (e.g. ``-1``); label losses mask them with
        :attr:`label_mask`, and the replacement keeps their (masked) values finite.
        """
        labels = require(self.batch, self.label_key, method=method)
        return labels if self.labeled is None else jnp.where(self.labeled, labels, 0)


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


def check_weight(weight: Weight) -> Weight:
    """A weight is a schedule (checked when it runs) or a finite number ``>= 0``."""
    if not callable(weight):
        check_nonnegative("weight", weight)
    return weight


def resolve_weight(weight: Weight, step: Array) -> Array:
    """The weight's value at ``step`` as a float32 scalar."""
    return jnp.asarray(weight(step) if callable(weight) else weight, jnp.float32)


def multiply_weights(a: Weight, b: Weight) -> Weight:
    """``a · b`` for constants or schedules: a schedule times a constant stays a schedule of the product."""
    check_weight(a)
    check_weight(b)
    if not callable(a) and not callable(b):
        return check_weight(float(a) * float(b))
    return lambda step: resolve_weight(a, step) * resolve_weight(b, step)


def until(steps: int) -> Callable[[Array], Array]:
    """The weight schedule ``1`` while ``step < steps``, then ``0``: a method that runs in a first stage only
    (FitNets' hint training, FT's paraphraser). ``until(n) * fitnets(...) + after(n) * (ce() + kd())`` is a
    two-stage run in one train state."""
    steps = check_stage_steps("until", steps)
    return lambda step: jnp.asarray(step < steps, jnp.float32)


def after(steps: int) -> Callable[[Array], Array]:
    """The weight schedule ``0`` while ``step < steps``, then ``1``: a method of a second stage."""
    steps = check_stage_steps("after", steps)
    return lambda step: jnp.asarray(step >= steps, jnp.float32)


def check_stage_steps(name: str, steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int,)) or steps < 0:
        raise ValueError(f"{name}(steps) takes a whole number of steps >= 0, got {steps!r}")
    return int(steps)


def check_name(name: Any) -> str:
    """A method name is a non-empty string without ``/`` (it prefixes its metrics), not a reserved one."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"a method name must be a non-empty string without '/', got {name!r}")
    if name in RESERVED_NAMES:
        raise ValueError(
            f"a method may not be named {name!r}: the train step reports a metric of that name; "
            f"reserved: {RESERVED_NAMES}. Rename it with .named()"
        )
    return name


def _names(entry: str, names: Any) -> tuple[str, ...]:
    """``names`` as a tuple of distinct non-empty strings, in order (a lone string is refused: it is not a
    sequence of names)."""
    if isinstance(names, str) or not isinstance(names, (tuple, list)):
        raise TypeError(f"Needs.{entry} takes a tuple of names, got {names!r}")
    for n in names:
        if not isinstance(n, str) or not n:
            raise TypeError(f"Needs.{entry} takes non-empty strings, got {n!r} in {names!r}")
    return tuple(dict.fromkeys(names))


@dataclasses.dataclass(frozen=True)
class Needs:
    """What a method needs from the train state and its batches: one record, checked by :func:`jaxkd.create`
    and read by experiments (which participants to build, trained or frozen; what the batches carry).

    Nothing is assumed: a method that reads the participant named ``"teacher"`` lists it. The student is
    always there and always trained, so naming it adds nothing. Combine records with :meth:`merge` (or
    ``a | b``), as :func:`chain` does.

    Attributes:
      participants: every participant whose outputs the loss reads besides the student, in order; the
        ``trained`` ones are added. :func:`jaxkd.create` refuses a state without one (the error lists the
        participants the state has).
      trained: the participants besides the student the method trains (a mutual-learning peer, an online
        teacher, the participant in a method's ``student`` role); experiments create them trainable, and
        :func:`jaxkd.create` refuses a frozen one.
      labels: whether the loss reads the labels (``batch[label_key]``).
      batch_keys: other batch entries the loss reads (checked against the sample batch).
      meta_prefix: for a method with a held-out meta objective (TGeo-KD): the batch also carries a meta
        batch under the same keys with this prefix (``"meta_image"``, ``"meta_label"``); ``None`` otherwise.
      cross_vocabulary: the loss relates outputs over *different* vocabularies itself (cross-tokenizer
        distillation); otherwise :func:`jaxkd.create` requires every participant to predict the student's
        classes.
    """

    participants: tuple[str, ...] = ()
    trained: tuple[str, ...] = ()
    labels: bool = False
    batch_keys: tuple[str, ...] = ()
    meta_prefix: str | None = None
    cross_vocabulary: bool = False

    def __post_init__(self):
        trained = _names("trained", self.trained)
        reads = _names("participants", self.participants)
        object.__setattr__(self, "participants", tuple(n for n in dict.fromkeys((*reads, *trained)) if n != STUDENT))
        object.__setattr__(self, "trained", tuple(n for n in trained if n != STUDENT))
        object.__setattr__(self, "batch_keys", _names("batch_keys", self.batch_keys))
        object.__setattr__(self, "labels", bool(self.labels))
        object.__setattr__(self, "cross_vocabulary", bool(self.cross_vocabulary))
        if self.meta_prefix is not None and not isinstance(self.meta_prefix, str):
            raise TypeError(f"Needs.meta_prefix is a string or None, got {self.meta_prefix!r}")
        if self.meta_prefix == "":
            raise ValueError("Needs.meta_prefix must not be empty: the meta batch's keys would be the batch's own")

    @property
    def teacher(self) -> bool:
        """Whether the participant named ``"teacher"`` is read (``"teacher" in participants``)."""
        return TEACHER in self.participants

    @property
    def learned_from(self) -> tuple[str, ...]:
        """The participants read but not trained by the method: the teachers it needs (frozen, or trained
        elsewhere)."""
        return tuple(n for n in self.participants if n not in self.trained)

    def merge(self, *others: "Needs") -> "Needs":
        """What this method and ``others`` need together (a chain's record): every participant, trained one
        and batch key in order of appearance, labels or a shared vocabulary relation if any needs them. Meta
        batches must agree: two different ``meta_prefix`` are refused."""
        records = (self, *others)
        for r in others:
            if not isinstance(r, Needs):
                raise TypeError(f"Needs.merge takes Needs records, got {type(r).__name__}")
        prefixes = sorted({r.meta_prefix for r in records if r.meta_prefix is not None})
        if len(prefixes) > 1:
            raise ValueError(f"methods in a chain must share one meta batch, got meta prefixes {prefixes}")
        return Needs(
            participants=tuple(n for r in records for n in r.participants),
            trained=tuple(n for r in records for n in r.trained),
            labels=any(r.labels for r in records),
            batch_keys=tuple(k for r in records for k in r.batch_keys),
            meta_prefix=prefixes[0] if prefixes else None,
            cross_vocabulary=any(r.cross_vocabulary for r in records),
        )

    def __or__(self, other: "Needs") -> "Needs":
        if not isinstance(other, Needs):
            return NotImplemented
        return self.merge(other)


#: The former keyword arguments and attributes of :class:`Method`, each an entry of :class:`Needs` now.
_FORMER_NEEDS = {"needs_teacher": "teacher", "needs_labels": "labels", "batch_keys": "batch_keys",
                 "meta_prefix": "meta_prefix", "participants": "participants", "trained": "trained",
                 "cross_vocabulary": "cross_vocabulary"}


def _needs_of(needs_teacher: bool = False, needs_labels: bool = False, batch_keys: tuple[str, ...] = (),
              meta_prefix: str | None = None, participants: tuple[str, ...] = (), trained: tuple[str, ...] = (),
              cross_vocabulary: bool = False) -> Needs:
    """The record the former keyword arguments of :class:`Method` described."""
    return Needs(participants=(*participants, *((TEACHER,) if needs_teacher else ())), trained=trained,
                 labels=needs_labels, batch_keys=batch_keys, meta_prefix=meta_prefix,
                 cross_vocabulary=cross_vocabulary)


def _former_attribute(attribute: str) -> property:
    entry = _FORMER_NEEDS[attribute]

    def read(self: "Method"):
        warnings.warn(f"Method.{attribute} is deprecated: read Method.needs.{entry} (what a method needs is one "
                      f"record, jaxkd.methods.Needs)", FutureWarning, stacklevel=2)
        return getattr(self.needs, entry)

    read.__doc__ = f"Former name of ``needs.{entry}`` (warns)."
    return property(read)


@dataclasses.dataclass(frozen=True, eq=False, init=False)
class Method:
    """A distillation objective with its own variables. Build one with a factory (``jaxkd.methods.kd``).

    Attributes:
      name: the key of this method's variables and metrics inside a :func:`chain`.
      loss: ``(vars, inputs, rng) -> (scalar, LossAux)``.
      init: ``(rng, inputs) -> MethodVars``; the default has no variables.
      update: ``(params, state, info) -> state`` after the optimizer step; the default keeps the state.
      weight: multiplier (or schedule ``step -> multiplier``) of this term in a chain.
      predict: ``(vars, student_outputs) -> logits`` used by evaluation, or ``None`` for the student's
        own logits.
      terms: for a chain, its members (empty for a single method).
      needs: what the loss reads and trains (:class:`Needs`): participants, trained ones, labels, batch
        keys, a meta batch, the vocabulary relation. Checked when the train state is created.
      prepare: ``(vars, batch, rng) -> batch``, a transform of the training batch applied before every
        participant's forward pass (:mod:`jaxkd.methods.augment`), or ``None`` (the batch as it comes).

    ``predict``, ``terms``, ``needs`` and ``prepare`` are keyword-only. The former keywords ``needs_teacher``,
    ``needs_labels``, ``batch_keys``, ``meta_prefix``, ``participants``, ``trained`` and
    ``cross_vocabulary`` still build the record (with a ``FutureWarning``), and reading them off a method
    forwards to :attr:`needs` (also warning).
    """

    name: str
    loss: Callable[[MethodVars, LossInputs, Array], tuple[Array, LossAux]]
    init: Callable[[Array, LossInputs], MethodVars] = _no_vars
    update: Callable[[PyTree, PyTree, StepInfo], PyTree] = _keep_state
    weight: Weight = 1.0
    predict: Callable[[MethodVars, Outputs], Array] | None = None
    terms: tuple["Method", ...] = ()
    needs: Needs = Needs()
    prepare: Callable[[MethodVars, Mapping[str, Array], Array], Mapping[str, Array]] | None = None

    def __init__(
        self,
        name: str,
        loss: Callable[[MethodVars, LossInputs, Array], tuple[Array, LossAux]],
        init: Callable[[Array, LossInputs], MethodVars] = _no_vars,
        update: Callable[[PyTree, PyTree, StepInfo], PyTree] = _keep_state,
        weight: Weight = 1.0,
        *,
        predict: Callable[[MethodVars, Outputs], Array] | None = None,
        terms: tuple["Method", ...] = (),
        needs: Needs = Needs(),
        prepare: Callable[[MethodVars, Mapping[str, Array], Array], Mapping[str, Array]] | None = None,
        **former: Any,
    ):
        if not isinstance(needs, Needs):
            raise TypeError(f"Method(needs=...) takes a jaxkd.methods.Needs record, got {type(needs).__name__}")
        if former:
            unknown = sorted(set(former) - set(_FORMER_NEEDS))
            if unknown:
                raise TypeError(f"Method() got unexpected keyword arguments {unknown}")
            warnings.warn(
                f"Method({', '.join(f'{k}=' for k in former)}) is deprecated: pass needs=jaxkd.methods.Needs(...) "
                f"(entries participants, trained, labels, batch_keys, meta_prefix, cross_vocabulary)",
                FutureWarning, stacklevel=2)
            needs = needs | _needs_of(**former)
        for field, value in (("name", name), ("loss", loss), ("init", init), ("update", update),
                             ("weight", weight), ("predict", predict), ("terms", tuple(terms)), ("needs", needs),
                             ("prepare", prepare)):
            object.__setattr__(self, field, value)
        if not self.terms:
            check_name(self.name)
        check_weight(self.weight)
        if prepare is not None and not callable(prepare):
            raise TypeError(f"Method(prepare=...) takes a function (vars, batch, rng) -> batch or None, got {prepare!r}")

    needs_teacher = _former_attribute("needs_teacher")
    needs_labels = _former_attribute("needs_labels")
    batch_keys = _former_attribute("batch_keys")
    meta_prefix = _former_attribute("meta_prefix")
    participants = _former_attribute("participants")
    trained = _former_attribute("trained")
    cross_vocabulary = _former_attribute("cross_vocabulary")

    def __getattr__(self, attribute: str):
        # TrainState.method was once the method's variables: point old code at where they are now.
        if attribute in ("params", "state"):
            raise AttributeError(f"a Method has no {attribute!r}: a train state's method variables are "
                                 f"state.method_vars.{attribute} (state.method is the method itself)")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attribute!r}")

    def named(self, name: str) -> "Method":
        """The same method under another name (to use one method twice in a chain)."""
        return dataclasses.replace(self, name=name)

    def __add__(self, other: "Method") -> "Method":
        if not isinstance(other, Method):
            return NotImplemented
        return chain(self, other)

    def __mul__(self, weight: Weight) -> "Method":
        """``w * method``: the weight multiplies the method's own (constant or schedule); on a chain,
        every member's."""
        if isinstance(weight, Method):
            return NotImplemented
        if self.terms:
            return chain(*(member * weight for member in self.terms), name=self.name)
        return dataclasses.replace(self, weight=multiply_weights(weight, self.weight))

    __rmul__ = __mul__


def require(batch: Mapping[str, Array], key: str, *, method: str) -> Array:
    """``batch[key]`` with an error that names who needs it and the keys the batch has."""
    try:
        return batch[key]
    except KeyError:
        raise ValueError(f"{method!r} needs batch[{key!r}], but the batch has keys {sorted(batch)}") from None


def stateless_method(
    name: str,
    compute: Callable[[LossInputs, Array], Array | tuple[Array, Mapping[str, Array]]],
    *,
    weight: Weight = 1.0,
    participants: tuple[str, ...] = (),
    trained: tuple[str, ...] = (),
    needs_labels: bool = False,
    batch_keys: tuple[str, ...] = (),
    needs: Needs = Needs(),
    **former: Any,
) -> Method:
    """A method without variables: its loss is ``compute(inputs, rng)``, a value or ``(value, metrics)``.

    What it needs is ``needs`` (a :class:`Needs`) merged with the same entries given as keywords:
    ``participants`` names every participant it reads besides the student — the teacher too,
    ``participants=("teacher",)``: none is assumed — ``trained`` those it trains, ``needs_labels`` whether it
    reads the labels and ``batch_keys`` the other batch entries. A participant missing at run time is
    reported here, naming the method. A loss comparing a learner's logits with a target's is
    :func:`logit_roles_method`.

    The former ``needs_teacher=True`` (then the default) still adds ``"teacher"``, with a ``FutureWarning``.
    """
    if former:
        if set(former) != {"needs_teacher"}:
            unknown = sorted(set(former) - {"needs_teacher"})
            raise TypeError(f"stateless_method() got unexpected keyword arguments {unknown}")
        warnings.warn("stateless_method(needs_teacher=...) is deprecated: name the participants the method reads, "
                      "participants=('teacher',) (none is assumed)", FutureWarning, stacklevel=2)
    needs = Needs(participants=(*participants, *((TEACHER,) if former.get("needs_teacher") else ())), trained=trained,
                  labels=needs_labels, batch_keys=batch_keys) | needs

    def loss(vars: MethodVars, inputs: LossInputs, rng: Array) -> tuple[Array, LossAux]:
        for participant in needs.participants:
            inputs.output(participant, method=name)  # a missing one is reported naming this method
        out = compute(inputs, rng)
        value, metrics = out if isinstance(out, tuple) else (out, {})
        return value, LossAux(dict(metrics), vars.state)

    return Method(name=name, loss=loss, weight=weight, needs=needs)


def check_roles(method: str, student: str, teacher: str) -> None:
    """The participants in the ``student`` and ``teacher`` roles of a method are two different names."""
    for role, value in (("student", student), ("teacher", teacher)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{method}: {role} must name a participant (a non-empty string), got {value!r}")
    if student == teacher:
        raise ValueError(f"{method}: the student and the teacher must be different participants, both are {student!r}")


def logit_roles_method(
    name: str,
    compute: Callable[[Array, Array, LossInputs, Array], Array | tuple[Array, Mapping[str, Array]]],
    *,
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    needs_labels: bool = False,
    batch_keys: tuple[str, ...] = (),
) -> Method:
    """A method comparing one participant's logits with another's: its loss is ``compute(z_s, z_t, inputs,
    rng)``, ``z_s = inputs.output(student).logits`` (trained) and ``z_t = inputs.target(teacher).logits``
    (gradient-stopped).

    ``student`` and ``teacher`` name the participants in those two roles: ``dkd(student="peer",
    teacher="student")`` teaches a trained peer with the student's predictions and never trains the student
    through this term. The method reads both and trains the one in the ``student`` role (so
    :func:`jaxkd.create` refuses a frozen learner, and experiments create it trainable).
    """
    check_roles(name, student, teacher)
    return stateless_method(
        name,
        lambda inputs, rng: compute(
            inputs.output(student, method=name).logits, inputs.target(teacher, method=name).logits, inputs, rng
        ),
        weight=weight, needs_labels=needs_labels, batch_keys=batch_keys,
        participants=(student, teacher), trained=(student,),
    )


def logit_method(
    name: str,
    loss_fn: Callable[..., Array],
    *,
    weight: Weight = 1.0,
    student: str = "student",
    teacher: str = "teacher",
    **hyperparameters,
) -> Method:
    """The method ``loss_fn(student_logits, teacher_logits, mask=example_mask, **hyperparameters)`` in the
    roles ``student`` and ``teacher`` (see :func:`logit_roles_method`)."""
    return logit_roles_method(
        name, lambda zs, zt, inputs, rng: loss_fn(zs, zt, mask=inputs.example_mask, **hyperparameters),
        student=student, teacher=teacher, weight=weight,
    )


def chain(*methods: Method, name: str = "chain") -> Method:
    """Composes methods into one: ``L = Σ_i w_i(step) · L_i``.

    Each member's variables live under ``vars.params[member.name]`` / ``vars.state[member.name]``.
    Metrics: ``"<member>"`` is the member's unweighted loss, ``"<member>/<metric>"`` its own metrics,
    ``"<member>/weight"`` the weight used when it is a schedule, and ``"loss"`` the weighted total.
    Nested chains are flattened; names must be unique (rename with ``method.named("kd2")``). The chain needs
    what its members need together (:meth:`Needs.merge`: members with different meta batches are refused).
    Members' batch transforms (``prepare``) run in chain order, member ``i`` with key ``fold_in(rng, i)``.
    """
    flat: list[Method] = []
    for m in methods:
        if not isinstance(m, Method):
            raise TypeError(f"chain takes Method objects, got {type(m).__name__}")
        flat.extend(m.terms or (m,))
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
            value, aux = m.loss(MethodVars(vars.params[m.name], vars.state[m.name]), inputs, r)
            value = jnp.asarray(value, jnp.float32)
            w = resolve_weight(m.weight, inputs.step)
            total = total + w * value
            metrics[m.name] = value
            if callable(m.weight):
                metrics[f"{m.name}/weight"] = w
            for key, metric in aux.metrics.items():
                full = f"{m.name}/{key}"
                if full in metrics:
                    raise ValueError(f"method {m.name!r} reports a metric {key!r} that collides with {full!r}")
                metrics[full] = metric
            new_state[m.name] = aux.state
        metrics["loss"] = total
        return total, LossAux(metrics, new_state)

    def update(params: PyTree, state: PyTree, info: StepInfo) -> PyTree:
        return {m.name: m.update(params[m.name], state[m.name], info) for m in terms}

    needs = Needs().merge(*(m.needs for m in terms))  # refuses members with different meta batches
    prepare = _composed_transforms(terms)
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
        predict=predict,
        terms=terms,
        needs=needs,
        prepare=prepare,
    )


def _composed_transforms(terms: tuple[Method, ...]) -> Callable | None:
    """The members' batch transforms applied in chain order (``None`` when no member has one); member ``i``
    draws with ``fold_in(rng, i)``, so its draws do not depend on which other members transform the batch."""
    transforms = [(i, m) for i, m in enumerate(terms) if m.prepare is not None]
    if not transforms:
        return None

    def prepare(vars: MethodVars, batch: Mapping[str, Array], rng: Array) -> Mapping[str, Array]:
        for i, m in transforms:
            batch = m.prepare(MethodVars(vars.params[m.name], vars.state[m.name]), batch, jax.random.fold_in(rng, i))
        return batch

    return prepare


def as_chain(method: Method | Sequence[Method]) -> Method:
    """A chain of whatever was given, so train states always hold variables keyed by method name."""
    if isinstance(method, Method):
        return method if method.terms else chain(method)
    return chain(*method)
