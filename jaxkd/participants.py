"""The models taking part in a distillation: the student, any number of teachers and peers.

A :class:`Participant` is a model plus how it takes part: which batch entries it reads, whether it is
trained, which optimizer steps it and how its parameters are sharded. The train state holds one
variables tree per participant under its name; methods read any participant's outputs by name
(``inputs.output("student")`` for the outputs a term trains, ``inputs.target("teacher_b")`` for a
gradient-stopped target).

Inputs: a participant reads ``batch[input]`` (a key), a dict of several entries (a sequence of keys:
a language model's tokens, positions and padding mask) or whatever a function of the batch returns
(a teacher that sees another view or resolution than the student).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence, Union

import jax
import numpy as np
import optax

from jaxkd.batch import IMAGE
from jaxkd.models.base import Model

PyTree = Any
Input = Union[str, Sequence[str], Callable[[Mapping[str, Any]], Any]]

#: The participant every method trains and evaluation scores.
STUDENT = "student"
#: The participant a method's ``teacher`` role names by default (and ``state.teacher``).
TEACHER = "teacher"
#: Names a participant may not have: the optimizer state keys the method's parameters by ``"method"``.
RESERVED = ("method",)


def _missing(batch: Mapping[str, Any], keys: Sequence[str], who: str) -> None:
    absent = [k for k in keys if k not in batch]
    if absent:
        raise ValueError(f"participant {who!r} reads batch entries {absent}, but the batch has {sorted(batch)}")


@dataclasses.dataclass(frozen=True, eq=False)
class Participant:
    """One model in a distillation.

    Attributes:
      model: the :class:`~jaxkd.models.Model`.
      variables: its starting ``{"params": ..., "batch_stats": ...}``; required for a frozen participant
        (a randomly initialized teacher is almost always a bug), ``None`` initializes a trained one.
        The train state keeps its own copy; the static description keeps none.
      trains: trained (its parameters get gradients and optimizer state, its batch statistics update,
        it runs in train mode) or frozen (it runs once per step in eval mode, outside the
        differentiated function and under ``stop_gradient``).
      input: ``batch[input]`` for a key, ``{k: batch[k]}`` for a sequence of keys, ``input(batch)`` for a
        function.
      tx: this participant's own optimizer (a peer with another learning rate); ``None`` uses the state's.
      rules: how its parameters are sharded (:class:`jaxkd.sharding.Rules`); ``None`` uses the default
        for the mesh (fully sharded over ``fsdp`` when that axis is larger than 1, else replicated).
      trainable: for a trained participant, which of its parameters the optimizer updates: a regex
        (``re.fullmatch``) over parameter paths such as ``"block_0/attention/query_lora_a"``, or a predicate
        ``path -> bool``; ``None`` (the default) trains all. The others stay bit-identical: they get no
        gradient (``stop_gradient``) and no optimizer state (``optax.set_to_zero`` in the
        ``optax.multi_transform``). LoRA: ``trainable=jaxkd.models.lora.ADAPTERS``.
    """

    model: Model
    variables: PyTree | None = None
    trains: bool = True
    input: Input = IMAGE
    tx: optax.GradientTransformation | None = None
    rules: Any = None
    trainable: str | Callable[[str], bool] | None = None

    def __post_init__(self):
        if self.trainable is not None:
            if not self.trains:
                raise ValueError("trainable= selects the parameters of a trained participant; this one is frozen "
                                 "(trains=False)")
            if isinstance(self.trainable, str):
                try:
                    re.compile(self.trainable)
                except re.error as err:
                    raise ValueError(f"trainable={self.trainable!r} is not a valid regex: {err}") from None
            elif not callable(self.trainable):
                raise ValueError(f"trainable must be a regex over parameter paths or a predicate path -> bool, "
                                 f"got {self.trainable!r}")
        if not isinstance(self.model, Model):
            raise ValueError(f"a participant's model must be a jaxkd.models.Model, got {type(self.model).__name__}")
        if not (isinstance(self.input, str) or callable(self.input) or _is_key_sequence(self.input)):
            raise ValueError(
                f"a participant's input is a batch key, a sequence of keys or a function of the batch, "
                f"got {self.input!r}"
            )

    def reads(self) -> tuple[str, ...]:
        """The batch keys this participant reads (none known for an input function)."""
        if isinstance(self.input, str):
            return (self.input,)
        return () if callable(self.input) else tuple(self.input)

    def model_input(self, batch: Mapping[str, Any], *, name: str = "model") -> Any:
        """What this participant's model is applied to, for ``batch``."""
        if callable(self.input):
            return self.input(batch)
        _missing(batch, self.reads(), name)
        return batch[self.input] if isinstance(self.input, str) else {k: batch[k] for k in self.input}

    def trainable_mask(self, params: PyTree) -> PyTree:
        """``params``' tree of Python bools: True for each leaf the optimizer updates (every one when
        :attr:`trainable` is ``None``). Paths are the leaves' keys joined by ``/``."""
        if self.trainable is None:
            return jax.tree.map(lambda _: True, params)
        select = (re.compile(self.trainable).fullmatch if isinstance(self.trainable, str) else self.trainable)
        return jax.tree_util.tree_map_with_path(lambda path, _: bool(select(param_path(path))), params)

    def stop_frozen_gradients(self, params: PyTree) -> PyTree:
        """``params`` with the leaves outside :attr:`trainable` under ``stop_gradient``: JAX differentiates
        them as constants (the matmul of a LoRA base weight's gradient is never traced; the gradient is zeros)."""
        if self.trainable is None:
            return params
        return jax.tree.map(lambda keep, p: p if keep else jax.lax.stop_gradient(p), self.trainable_mask(params),
                            params)

    def static(self) -> "Participant":
        """The same participant without its variables (what the train state keeps as static data)."""
        return dataclasses.replace(self, variables=None)

    def _key(self) -> tuple:
        return (id(self.model), self.trains, self.input if isinstance(self.input, (str, tuple)) else id(self.input),
                id(self.tx), self.rules,
                self.trainable if self.trainable is None or isinstance(self.trainable, str) else id(self.trainable))

    # Equal when everything but the variables is the same objects: two states built from the same models,
    # inputs and optimizers then share one compiled step (jit compares static fields by equality).
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Participant) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


def param_path(path: tuple) -> str:
    """A parameter's key path as ``"block_0/attention/query"``."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _is_key_sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and bool(value) and all(isinstance(k, str) for k in value)


def student(model: Model, variables: PyTree | None = None, **kwargs: Any) -> Participant:
    """A trained participant (``variables=None``: freshly initialized)."""
    return Participant(model, variables, trains=True, **kwargs)


def teacher(model: Model, variables: PyTree, *, trains: bool = False, **kwargs: Any) -> Participant:
    """A teacher: frozen by default (its trained ``variables`` are required), or trained online."""
    return Participant(model, variables, trains=trains, **kwargs)


def check_names(participants: Mapping[str, Participant]) -> None:
    if STUDENT not in participants:
        raise ValueError(f"the participants must include the {STUDENT!r}; got {sorted(participants)}")
    for name, p in participants.items():
        if not isinstance(name, str) or not name or "/" in name or name in RESERVED:
            raise ValueError(f"a participant name must be a non-empty string without '/', not {RESERVED}; got {name!r}")
        if not isinstance(p, Participant):
            raise ValueError(f"participant {name!r} must be a jaxkd.Participant, got {type(p).__name__}")
        if not p.trains and p.variables is None:
            raise ValueError(
                f"participant {name!r} is frozen, so its trained variables are required (load the teacher's "
                "variables); pass trains=True to train it from a fresh initialization"
            )
    if not participants[STUDENT].trains:
        raise ValueError("the student must be trained (trains=True)")


def num_examples(x: Any) -> int:
    """The leading (example) axis shared by every array of a model input."""
    sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else 0 for leaf in jax.tree.leaves(x)}
    if len(sizes) != 1:
        raise ValueError(f"a model input's arrays disagree on the number of examples: {sorted(sizes)}")
    return sizes.pop()


def cast_params(variables: PyTree, dtype: Any) -> PyTree:
    """``variables`` with every floating leaf under ``"params"`` cast to ``dtype`` (other collections, e.g.
    batch-norm statistics, stay as they are).

    With a model built with the same compute ``dtype`` (``models.get(name, dtype=jnp.bfloat16)``) this
    runs a frozen teacher in bfloat16 — parameters and activations, float32 logits:
    ``Participant(models.get("resnet32x4", num_classes=100, dtype=jnp.bfloat16),
    cast_params(teacher_variables, jnp.bfloat16), trains=False)``. It halves the teacher's parameter
    memory and, on accelerators with fast bf16 matrix units, its forward time; on a CPU whose convolutions
    are no faster in bf16 it only costs accuracy (``benchmarks/conv_forms.py``).
    """
    dtype = jax.numpy.dtype(dtype)
    if not jax.numpy.issubdtype(dtype, jax.numpy.floating):
        raise ValueError(f"cast_params casts to a floating dtype, got {dtype}")
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError(f"cast_params takes a variables dict with a 'params' entry, got {type(variables).__name__}")

    def cast(leaf):
        leaf_dtype = getattr(leaf, "dtype", None)
        if leaf_dtype is not None and jax.numpy.issubdtype(leaf_dtype, jax.numpy.floating):
            return leaf.astype(dtype)
        return leaf

    return {**variables, "params": jax.tree.map(cast, variables["params"])}
