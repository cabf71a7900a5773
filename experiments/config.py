"""Experiment configuration: one plain dataclass, Python config files, ``--set key=value`` overrides.

A config file is a Python module with ``get_config() -> Config`` (big_vision/scenic style, without the
ml_collections dependency). Overrides are parsed as Python literals when they look like one
(``--set steps=300 --set seeds=(0,1)``) and kept as strings otherwise (``--set student=resnet14``).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
from typing import Any, Sequence


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
    # Teacher.
    teacher: str = "resnet20"
    teacher_kwargs: dict = dataclasses.field(default_factory=dict)
    teacher_steps: int = 600
    teacher_lr: float = 0.05
    # Load teachers instead of training them: an Orbax directory written by `save_variables`, with
    # "{seed}" standing for the seed (e.g. "runs/teachers/seed{seed}").
    teacher_checkpoint: str | None = None
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
    data_parallel: bool = False  # shard batches over all local devices
    out_dir: str = "runs"


def load(path: str | None) -> Config:
    """``get_config()`` of the Python file at ``path`` (the defaults when ``path`` is None)."""
    if path is None:
        return Config()
    spec = importlib.util.spec_from_file_location("jaxkd_experiment_config", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no config file at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if not isinstance(config, Config):
        raise TypeError(f"{path}: get_config() must return experiments.config.Config")
    return config


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """Applies ``key=value`` overrides; ``methods.kd=...`` sets one entry of a dict field."""
    fields = {f.name for f in dataclasses.fields(config)}
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value")
        key, value = key.strip(), _value(text.strip())
        top, _, sub = key.partition(".")
        if top not in fields:
            raise ValueError(f"unknown config key {top!r}; keys: {sorted(fields)}")
        if sub:
            current = dict(changes.get(top, getattr(config, top)))
            current[sub] = value
            changes[top] = current
        else:
            changes[top] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(config, **changes)
