"""Experiment configuration: one plain dataclass, Python config files, ``--set key=value`` overrides.

A config file is a Python module with ``get_config() -> Config`` (big_vision/scenic style, without the
ml_collections dependency). Overrides are parsed as Python literals when they look like one
(``--set steps=300 --set seeds=(0,1)``) and kept as strings otherwise (``--set student=resnet14``).
Every config is checked by :func:`validate` (types and ranges of all fields) when it is loaded and
after overrides, so a bad value is reported up front, naming the field, instead of failing later.
"""

from __future__ import annotations

import ast
import collections.abc
import dataclasses
import difflib
import functools
import importlib.util
import math
import numbers
import os
import types
import typing
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jaxkd.checks import check_choice, check_int, check_nonnegative, check_number, check_positive
from jaxkd.data import AUGMENTATIONS


@dataclasses.dataclass
class Config:
    """Everything one distillation experiment needs.

    The teacher is trained (or loaded from ``teacher_checkpoint``) once per seed; then, for every entry
    of ``methods``, the same student is trained from scratch with that method under identical settings
    and seeds, and evaluated on the test split.
    """

    name: str = "experiment"
    # Data.
    dataset: str = "digits"
    data_dir: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    augment: str = "shift"
    # Streamed data sets (imagenet2012, experiments/streamed_data.py): the crop side, and the shorter side the
    # eval images are resized to before the center crop; training uses the random resized crop + flip unless
    # augment="none".
    image_size: int = 224
    resize_size: int = 256
    # Teacher.
    teacher: str = "resnet20"
    teacher_kwargs: dict = dataclasses.field(default_factory=dict)
    teacher_steps: int = 600
    teacher_lr: float = 0.05
    # Load the teacher instead of training it: an Orbax directory written by `save_variables`, or a PyTorch
    # checkpoint of the `teacher` architecture (a path ending in .pth, .pt or .safetensors, e.g. RepDistiller's
    # "resnet32x4_vanilla/ckpt_epoch_240.pth", read by jaxkd.models.load_torch with the dataset's class count),
    # with "{seed}" standing for the seed (e.g. "runs/teachers/seed{seed}/teacher").
    teacher_checkpoint: str | None = None
    # The compute dtype of frozen teachers while students distill from them: "bfloat16" casts their
    # parameters and runs their forward pass in bf16 (float32 logits; jaxkd.participants.cast_params).
    # Teachers are trained in float32 either way.
    frozen_dtype: str = "float32"
    # Cached frozen teacher (jaxkd.data.images.teacher_cache): None runs the teacher in every step; "fixed"
    # computes its logits of each training image once (augment="none" only); "fkd" stores FKD region soft
    # labels, the top `teacher_cache_k` classes on `teacher_cache_views` stored augmented views per image
    # (augment "shift" or "crop_flip"), and replays one stored view per image and epoch.
    teacher_cache: str | None = None
    teacher_cache_views: int = 8
    teacher_cache_k: int = 5
    # The mixed-precision policy of every trained participant: the student, peers and online teachers
    # (jaxkd.precision): "float32", or "bfloat16" (float32 parameters and optimizer state, bfloat16 compute,
    # float32 logits and losses). The teacher phase trains in float32 either way; frozen teachers run in
    # `frozen_dtype`.
    precision: str = "float32"
    # Further frozen teachers methods may read by name (multi_teacher_kd): name -> {"model": ..., "kwargs": {...}},
    # trained like the teacher (teacher_steps, teacher_lr) before the students.
    teachers: dict = dataclasses.field(default_factory=dict)
    # The architecture of peers trained next to the student (dml); None: the student's.
    peer: str | None = None
    peer_kwargs: dict = dataclasses.field(default_factory=dict)
    # Student.
    student: str = "resnet8"
    student_kwargs: dict = dataclasses.field(default_factory=dict)
    # Fewer labels: the student's training set is this many examples per class (None: the whole split).
    labels_per_class: int | None = None
    steps: int = 600
    lr: float = 0.05
    # Methods with a held-out meta objective (TGeo-KD) hold out this many of the student's labeled
    # examples per class as their meta set and train on the rest.
    meta_per_class: int = 2
    # The methods compared: run name -> method spec (see `jaxkd.methods.parse`).
    methods: dict = dataclasses.field(
        default_factory=lambda: {"scratch": "ce", "kd": "ce + kd(temperature=4)"}
    )
    # Optimization (shared by teacher and students): SGD with momentum, weight decay, and a schedule.
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "cosine" or "multistep"
    milestones: tuple = (0.625, 0.75, 0.875)  # fractions of the steps, for "multistep" (x0.1 each)
    # Seeds: every run is repeated per seed (teacher init, student init, shuffling, augmentation).
    seeds: tuple = (0, 1, 2)
    data_seed: int = 0  # fixes the labeled subset, identical for every run
    # Evaluation and logging.
    eval_every: int = 100
    eval_batch_size: int = 250
    # Teacher-student distances also scored for runs that read the teacher (big_vision's distill evaluators):
    # "agreement" (top-1 agreement) and "teacher_student_kl" (KL(teacher || student) at T = 1), as columns of
    # the results table (jaxkd.eval_metrics).
    eval_metrics: tuple = ()
    # Devices: None runs on the default device; a mesh shape shards the state and the batch, e.g.
    # {"data": -1} (every device, data parallel) or {"data": 2, "fsdp": 4} (see jaxkd.sharding.make_mesh).
    mesh: dict | None = None
    # Several hosts: call jax.distributed.initialize from JAXKD_COORDINATOR / JAXKD_NUM_PROCESSES /
    # JAXKD_PROCESS_ID (jaxkd.sharding.initialize_distributed); each host feeds its slice of the batch.
    distributed: bool = False
    # Checkpoint every this many steps (0: only at the end of each run); runs resume from the newest.
    checkpoint_every: int = 200
    # Also write metrics as TensorBoard event files under <run folder>/tensorboard.
    tensorboard: bool = True
    out_dir: str = "runs"
    # JAX's persistent compilation cache (jaxkd.compilation_cache): "default" is $JAXKD_COMPILATION_CACHE or
    # ~/.cache/jaxkd/xla, a path another folder, None no cache. A second run compiles nothing it compiled before.
    compilation_cache: str | None = "default"


SCHEDULES = ("cosine", "multistep")
FROZEN_DTYPES = ("float32", "bfloat16")


# ----- field checks: (name, value) -> None, raising ValueError naming the field -----


def at_least(low: int) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        check_int(name, value, low=low)
    return check


def optional(check: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
    """``check`` unless the value is None."""
    def optional_check(name: str, value: Any) -> None:
        if value is not None:
            check(name, value)
    return optional_check


def one_of(choices: tuple) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        check_choice(name, value, choices)
    return check


def check_seeds(name: str, value: Any) -> None:
    if not value:
        raise ValueError(f"{name} must be {_EXPECTED['seeds']}, got {name}={value!r}")
    for i, seed in enumerate(value):
        check_int(f"{name}[{i}]", seed, low=0)
    if len(set(value)) != len(value):
        raise ValueError(f"{name} must be distinct (each run is repeated per seed), got {name}={value!r}")


def check_precision(name: str, value: Any) -> None:
    """``value`` names a :func:`jaxkd.precision.policy` (float16 is refused with the reason)."""
    from jaxkd.precision import policy

    try:
        policy(value)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def check_milestones(name: str, value: Any) -> None:
    for i, milestone in enumerate(value):
        check_number(f"{name}[{i}]", milestone, low=0.0, high=1.0, low_open=True, high_open=True)
    if any(a >= b for a, b in zip(value, value[1:])):
        raise ValueError(f"{name} must be strictly increasing fractions of the steps, got {name}={value!r}")


def check_methods(name: str, value: Any) -> None:
    if not value:
        raise ValueError(f"{name} must be {_EXPECTED['methods']}, got {name}={value!r}")
    for run, spec in value.items():
        if not isinstance(run, str) or not run or "/" in run:
            raise ValueError(f"{name} keys must be non-empty strings without '/' (run names), got {run!r}")
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(
                f"{name}[{run!r}] must be a non-empty method spec string "
                f"(e.g. 'ce + kd(temperature=4)'), got {spec!r}"
            )


#: The teacher-student distances an experiment can report (``Config.eval_metrics``).
EVAL_METRICS = ("agreement", "teacher_student_kl")


def check_eval_metrics(name: str, value: Any) -> None:
    for i, metric in enumerate(value):
        check_choice(f"{name}[{i}]", metric, EVAL_METRICS)


def check_mesh(name: str, value: Any) -> None:
    for axis, size in value.items():
        if axis not in ("data", "fsdp", "tensor") or isinstance(size, bool) or not isinstance(size, int):
            raise ValueError(f"{name} must be {_EXPECTED['mesh']}, got {name}={value!r}")


#: ``teacher_checkpoint`` suffixes read by ``jaxkd.models.load_torch`` (anything else is an Orbax directory).
TORCH_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")


def is_torch_checkpoint(path: str) -> bool:
    """Whether the teacher checkpoint ``path`` is a PyTorch file (``.pth``/``.pt``/``.safetensors``)."""
    return os.path.splitext(path)[1].lower() in TORCH_CHECKPOINT_SUFFIXES


def check_teachers(name: str, value: Any) -> None:
    for teacher, entry in value.items():
        if not isinstance(teacher, str) or not teacher or teacher in ("teacher", "student") or "/" in teacher:
            raise ValueError(f"{name} keys must be new participant names (not 'teacher'/'student'), got {teacher!r}")
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str) or set(entry) - {"model", "kwargs"}:
            raise ValueError(f"{name}[{teacher!r}] must be {{'model': <name>, 'kwargs': {{...}}}}, got {entry!r}")


def check_string_keys(name: str, value: Any) -> None:
    for key in value:
        if not isinstance(key, str):
            raise ValueError(f"{name} keys must be strings (model keyword arguments), got {key!r}")


def positive(name: str, value: Any) -> None:
    check_positive(name, value)


def nonnegative(name: str, value: Any) -> None:
    check_nonnegative(name, value)


def check_momentum(name: str, value: Any) -> None:
    check_number(name, value, low=0.0, high=1.0, high_open=True)


#: Range checks of :class:`Config`'s fields beyond their types (the type is checked first).
Config.CHECKS = {
    **{name: at_least(1) for name in
       ("steps", "teacher_steps", "batch_size", "eval_batch_size", "eval_every", "meta_per_class",
        "image_size", "resize_size")},
    "lr": positive, "teacher_lr": positive, "momentum": check_momentum, "weight_decay": nonnegative,
    "data_seed": at_least(0), "labels_per_class": optional(at_least(1)), "schedule": one_of(SCHEDULES),
    "augment": one_of(AUGMENTATIONS), "frozen_dtype": one_of(FROZEN_DTYPES), "precision": check_precision,
    "seeds": check_seeds, "milestones": check_milestones, "methods": check_methods, "checkpoint_every": at_least(0),
    "mesh": optional(check_mesh), "teachers": check_teachers, "teacher_kwargs": check_string_keys,
    "student_kwargs": check_string_keys, "peer_kwargs": check_string_keys, "eval_metrics": check_eval_metrics,
    "teacher_cache": optional(one_of(("fixed", "fkd"))), "teacher_cache_views": at_least(1),
    "teacher_cache_k": at_least(1),
}


@functools.cache
def _field_types(config_type: type) -> dict[str, Any]:
    return {name: hint for name, hint in typing.get_type_hints(config_type).items()
            if typing.get_origin(hint) is not typing.ClassVar}


def _options(hint: Any) -> tuple[Any, ...]:
    """The types a field annotated ``hint`` accepts: ``str | None -> (str, NoneType)``, ``int -> (int,)``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _runtime_type(option: Any) -> Any:
    """The class ``isinstance`` checks for an annotation: ``Mapping[str, Any] -> Mapping``, ``tuple[int, ...]
    -> tuple``."""
    return typing.get_origin(option) or option


_TYPE_NAMES = {
    str: "a string", int: "an integer", float: "a number", bool: "True or False", dict: "a dict",
    collections.abc.Mapping: "a dict", tuple: "a tuple", type(None): "None",
}
# What a field must be, where its type alone says too little.
_EXPECTED = {
    "seeds": "a non-empty tuple of distinct integers >= 0, e.g. (0, 1, 2)",
    "milestones": "a tuple of increasing fractions of the steps in (0, 1), e.g. (0.5, 0.75)",
    "methods": "a non-empty dict of run name -> method spec, e.g. {'kd': 'ce + kd(temperature=4)'}",
    "teacher_kwargs": "a dict of model keyword arguments, e.g. {'hidden_sizes': (32,)}",
    "student_kwargs": "a dict of model keyword arguments, e.g. {'hidden_sizes': (32,)}",
    "peer_kwargs": "a dict of model keyword arguments, e.g. {'hidden_sizes': (32,)}",
    "teachers": "a dict of teacher name -> {'model': ..., 'kwargs': {...}}, e.g. {'teacher2': {'model': 'resnet14'}}",
    "mesh": "None or a dict of mesh axis sizes, e.g. {'data': -1} or {'data': 2, 'fsdp': 4}",
}


def _type_name(name: str, hint: Any) -> str:
    if name in _EXPECTED:
        return _EXPECTED[name]
    return " or ".join(_TYPE_NAMES.get(_runtime_type(t), getattr(t, "__name__", str(t))) for t in _options(hint))


def _check_type(name: str, value: Any, hint: Any) -> None:
    """``value`` is of the annotated type ``hint`` (``int``, ``float``, ``X | None``, ``dict`` …).

    Bools are not numbers here, int fields refuse floats (``1.5`` would be truncated), float fields
    accept ints.
    """
    options = _options(hint)
    if value is None and type(None) in options:
        return
    is_bool = isinstance(value, (bool, np.bool_))
    for option in options:
        if option is int:
            ok = isinstance(value, numbers.Integral) and not is_bool
        elif option is float:
            ok = isinstance(value, numbers.Real) and not is_bool
        elif option is Any:
            ok = True
        else:
            ok = option is not type(None) and isinstance(value, _runtime_type(option))
        if ok:
            return
    # For plain number fields, the shared checks phrase the error as everywhere else in jaxkd.
    if options == (int,):
        check_int(name, value)
    if options == (float,):
        check_number(name, value, finite=False)
    raise ValueError(
        f"{name} must be {_type_name(name, hint)}, got {name}={value!r} ({type(value).__name__})"
    )


def _check_field(config_type: type, name: str, value: Any) -> None:
    """Raises ``ValueError`` unless ``value`` is a valid value of ``config_type``'s field ``name``: its
    annotated type, then the range check ``config_type.CHECKS[name]`` if it has one."""
    _check_type(name, value, _field_types(config_type)[name])
    check = getattr(config_type, "CHECKS", {}).get(name)
    if check is not None:
        check(name, value)


def validate(config: Any) -> None:
    """Checks every field of an experiment config (a dataclass instance: :class:`Config` or a language-model
    experiment's) against its annotated type and the class's range checks (``CHECKS``: field -> check).

    :class:`Config`'s ranges: ``steps``, ``teacher_steps``, ``batch_size``, ``eval_batch_size``, ``eval_every``,
    ``meta_per_class`` >= 1; ``lr``, ``teacher_lr`` finite > 0; ``momentum`` in [0, 1);
    ``weight_decay`` finite >= 0; ``seeds`` a non-empty tuple of distinct integers >= 0; ``data_seed``
    >= 0; ``labels_per_class`` None or >= 1; ``schedule`` in :data:`SCHEDULES`; ``frozen_dtype`` in
    :data:`FROZEN_DTYPES`; ``precision`` a :data:`jaxkd.precision.POLICIES` name; ``milestones`` strictly
    increasing in (0, 1); ``augment`` in :data:`jaxkd.data.AUGMENTATIONS`; ``methods`` a non-empty dict of run
    name -> method spec string;
    ``teacher_kwargs`` / ``student_kwargs`` dicts with string keys.

    Raises:
      ValueError: naming the first invalid field, what it must be and the value it has.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"expected an experiment config (a dataclass instance), got {type(config).__name__}")
    for field in dataclasses.fields(config):
        _check_field(type(config), field.name, getattr(config, field.name))
    extra_check = getattr(config, "check", None)
    if extra_check is not None:  # checks across fields (e.g. microbatches dividing batch_size)
        extra_check()


def parse_methods(specs: Mapping[str, str], constants: Mapping[str, Any]) -> dict[str, Any]:
    """A config's ``methods`` (run name -> spec) parsed with ``constants`` (:func:`jaxkd.methods.parse`), before
    anything trains; an error names the run."""
    from jaxkd import methods

    parsed = {}
    for name, spec in specs.items():
        try:
            parsed[name] = methods.parse(spec, constants)
        except ValueError as e:
            raise ValueError(f"config methods[{name!r}]: {e}") from None
    return parsed


def unknown_key_message(kind: str, key: str, known: Sequence[str]) -> str:
    """``unknown config key 'stpes' (did you mean 'steps'?); keys: [...]``."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {kind} {key!r}{hint}; keys: {sorted(known)}"


def load(path: str | None, config_type: type = None) -> Any:
    """``get_config()`` of the Python file at ``path`` (``config_type()``'s defaults when ``path`` is None),
    validated. ``config_type`` (default :class:`Config`) is the experiment's config class: a file returning
    another class is refused.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: the file defines no ``get_config()``, returns another config class, or a field of the
        config is invalid (see :func:`validate`); the message names the file.
    """
    config_type = Config if config_type is None else config_type
    if path is None:
        config = config_type()
        validate(config)
        return config
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file at {path}")
    spec = importlib.util.spec_from_file_location("jaxkd_experiment_config", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no config file at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"{path} defines no get_config()")
    config = module.get_config()
    if not isinstance(config, config_type):
        raise ValueError(f"{path}: get_config() must return {config_type.__module__}.{config_type.__qualname__}, "
                         f"got {type(config).__name__} (is it a config of another experiment script?)")
    try:
        validate(config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return config


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _typed(text: str, value: Any, hint: Any) -> Any:
    """Adapts a parsed override ``value`` to the field type ``hint`` where the intent is unambiguous.

    A string field keeps the text as typed (``name=123`` is the name "123"; ``data_dir=None`` is None);
    a float field reads ``nan`` / ``inf`` as floats (so they are refused as non-finite, not as
    non-numbers); an int field takes an integral float (``steps=1e3``); lists become tuples.
    """
    options = _options(hint)
    if str in options and not isinstance(value, str) and not (value is None and type(None) in options):
        return text
    if float in options and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if int in options and isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return tuple(value)
    return value


def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """Applies ``key=value`` overrides; ``methods.kd=...`` sets one entry of a dict field.

    Values are Python literals when they parse as one and strings otherwise, adapted to the field's
    type (see :func:`_typed`); the result is validated.

    Raises:
      ValueError: an override is malformed, names an unknown key, or gives an invalid value; the
        message quotes the override as typed (``--set steps=abc: steps must be an integer ...``).
    """
    config_type = type(config)
    types_ = _field_types(config_type)
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value")
        key, text = key.strip(), text.strip()
        value = _value(text)
        top, _, sub = key.partition(".")
        if top not in types_:
            raise ValueError(f"--set {item}: " + unknown_key_message("config key", top, types_))
        try:
            if sub:
                if _runtime_type(types_[top]) not in (dict, collections.abc.Mapping):
                    raise ValueError(f"{top} is not a dict field, so {key!r} cannot set an entry of it")
                current = dict(changes.get(top, getattr(config, top)))
                current[sub] = value
                changes[top] = current
            else:
                changes[top] = _typed(text, value, types_[top])
            _check_field(config_type, top, changes[top])
        except ValueError as e:
            raise ValueError(f"--set {item}: {e}") from None
    config = dataclasses.replace(config, **changes)
    validate(config)
    return config
