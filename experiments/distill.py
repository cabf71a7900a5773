"""Train a teacher, then the same student from scratch and with each distillation method; print a table.

    python -m experiments.distill                                  # the default (digits; time in the README)
    python -m experiments.distill --config experiments/configs/cifar100_resnet32x4_resnet8x4.py \\
        --set data_dir=/data/tfds
    python -m experiments.distill --set steps=300 --set "methods.kd_t8=ce + kd(temperature=8)"

Per seed: every frozen teacher a method reads (``teacher``, and the ``teachers`` of the config) is trained
on the full training split with cross-entropy (or loaded from ``teacher_checkpoint``: an Orbax directory, or a
PyTorch ``.pth``/``.pt``/``.safetensors`` checkpoint of the teacher architecture read by
``jaxkd.models.load_torch``), saved with Orbax in its own checkpoint, and loaded back from disk for distillation. Then every method of ``config.methods``
trains the student from the same initialization, data order and augmentation (same seed), for the same
number of steps, with the participants the method names: frozen teachers, or trained peers and online
teachers that start from scratch next to the student. The test accuracy after the last step is reported
for the student and every other trained participant (last, not best: picking the best epoch on the test
split inflates results).

Runs survive being killed. Every ``checkpoint_every`` steps, and at the end of each run, the whole train
state (frozen teachers excepted: the checkpoint names them by fingerprint), the data iterators' positions
and the run's results are saved asynchronously with Orbax under ``checkpoints/seed<seed>/<run>/``.
Re-running the same command with the same ``--out`` skips finished runs, resumes the interrupted one from
its newest intact checkpoint, and appends to ``metrics.jsonl`` without duplicates; the end result is
bitwise the uninterrupted run's (on CPU). SIGTERM saves a checkpoint and exits with status 143. A
checkpoint made with another configuration (method spec, models, steps, optimizer, data, teacher) is
refused, naming what differs (its ``precision`` and ``frozen_dtype`` included).

Precision: the student and every participant trained next to it (peers, online teachers) follow the
config's ``precision`` policy (:mod:`jaxkd.precision`: ``--set precision=bfloat16`` computes in bfloat16
with float32 parameters, optimizer state and logits); teachers are trained in float32 and, frozen, run in
``frozen_dtype``.

The run folder holds ``config.json``, ``metrics.jsonl`` (every train step and every evaluation),
``tensorboard/`` (the same, as TensorBoard event files), ``results.json``, ``results.md`` and
``learning_curves.png``, plus the teacher and run checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxkd
from jaxkd import compilation_cache, data, eval_metrics, methods, models, precision, sharding
from jaxkd.checkpoint import fingerprint, load_variables, save_variables
from jaxkd.data.images import teacher_cache as teacher_caches
from jaxkd.participants import cast_params

from experiments import config as config_lib
from experiments import report
from experiments import streamed_data
from experiments.run_log import PreemptionFlag
from experiments.runner import Evaluation, Runner, entry_point, progress_bar, run_command
from experiments.timing import Phases, describe

log = logging.getLogger("jaxkd.experiment")


#: ``num_examples`` while the specs are checked before the data is loaded (then parsed with the real count).
_UNKNOWN_NUM_EXAMPLES = 2**31 - 1
#: The result entries of jaxkd.eval_metrics.agreement and teacher_student_kl (Config.eval_metrics) a run's row
#: reports when it was scored by them.
DISTANCE_COLUMNS = ("agreement", "kl")


def parse_methods(cfg: config_lib.Config, num_examples: int = _UNKNOWN_NUM_EXAMPLES) -> dict[str, methods.Method]:
    """The config's method specs, parsed before anything trains. Specs may use the named constants
    ``steps`` (the student's step budget), ``batch_size``, ``lr`` (the student's learning rate) and
    ``num_examples`` (the examples the student trains on: CRD's memory bank size), e.g.
    ``"ce + taid(total_steps=steps)"``."""
    constants = {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "num_examples": num_examples}
    return config_lib.parse_methods(cfg.methods, constants)


def schedule_of(cfg: config_lib.Config, lr: float, steps: int) -> optax.Schedule:
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, steps)
    if cfg.schedule == "multistep":
        return optax.piecewise_constant_schedule(lr, {int(f * steps): 0.1 for f in cfg.milestones})
    raise ValueError(f"schedule must be 'cosine' or 'multistep', got {cfg.schedule!r}")


def make_optimizer(cfg: config_lib.Config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD with momentum and (coupled) weight decay, the optimizer of the CIFAR KD literature."""
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.sgd(schedule, momentum=cfg.momentum))


@dataclasses.dataclass
class Data:
    train: data.Split
    student_train: data.Split
    test_batches: list
    mean: tuple
    std: tuple


def load_data(cfg: config_lib.Config) -> Data:
    # --- ImageNet-style data sets stream from their TFDS source (experiments/streamed_data.py) ---
    if cfg.dataset in streamed_data.STREAMED:
        return Data(*streamed_data.load(cfg))
    # ---
    train = data.load_split(cfg.dataset, cfg.train_split, data_dir=cfg.data_dir)
    test = data.load_split(cfg.dataset, cfg.test_split, data_dir=cfg.data_dir)
    mean, std = data.NORMALIZATION.get(cfg.dataset) or data.channel_stats(train.images)
    student_train = train
    if cfg.labels_per_class is not None:
        student_train = train.subset(data.subset_per_class(train.labels, cfg.labels_per_class, cfg.data_seed))
    test_loader = data.Loader(
        test.images, test.labels, batch_size=cfg.eval_batch_size, mean=mean, std=std,
        shuffle=False, drop_remainder=False, num_epochs=1,
    )
    return Data(train, student_train, list(test_loader), mean, std)


def with_meta(batch: dict, meta_batch: dict, prefix: str | None) -> dict:
    """``batch`` plus ``meta_batch``'s entries under ``prefix`` (``batch`` itself when ``prefix`` is None)."""
    if prefix is None:
        return batch
    return {**batch, **{f"{prefix}{k}": v for k, v in meta_batch.items()}}


def with_index(batch: dict, method: methods.Method) -> dict:
    """``batch`` with an ``"index"`` entry when ``method`` reads one (the loader then yields it)."""
    if "index" not in method.needs.batch_keys:
        return batch
    return {**batch, "index": np.arange(len(batch["label"]), dtype=np.int32)}


def hold_out(split: data.Split, per_class: int, seed: int) -> tuple[data.Split, data.Split]:
    """``(rest, held_out)`` with ``per_class`` examples of each class held out (a meta/validation set)."""
    held = data.subset_per_class(split.labels, per_class, seed)
    rest = np.setdiff1d(np.arange(len(split)), held)
    return split.subset(rest), split.subset(held)


def data_config(cfg: config_lib.Config) -> dict[str, Any]:
    """The settings every run of the experiment shares (recorded in each checkpoint)."""
    keys = ("dataset", "data_dir", "train_split", "test_split", "augment", "labels_per_class", "meta_per_class",
            "batch_size", "momentum", "weight_decay", "schedule", "milestones", "data_seed")
    if cfg.dataset in streamed_data.STREAMED:  # the streamed data sets' crop sizes
        keys += ("image_size", "resize_size")
    return {k: getattr(cfg, k) for k in keys}


def train_loader(cfg: config_lib.Config, dataset: Data, split: data.Split, seed: int, *,
                 with_index: bool = False, batch_size: int | None = None) -> data.Loader:
    """The shuffled, augmented, endless loader of a training split (resumable: ``get_state``/``set_state``)."""
    if isinstance(split, streamed_data.StreamedSplit):  # ImageNet: streamed, decoded and augmented per batch
        return streamed_data.train_loader(cfg, split, seed, with_index=with_index, batch_size=batch_size or cfg.batch_size)
    return data.Loader(
        split.images, split.labels, batch_size=batch_size or cfg.batch_size, mean=dataset.mean, std=dataset.std,
        shuffle=True, seed=seed, drop_remainder=True, num_epochs=None, augment=cfg.augment,
        num_classes=split.num_classes, with_index=with_index,
    )


def check_batch_size(cfg: config_lib.Config, dataset: Data, run_methods: dict[str, methods.Method]) -> None:
    """Refuses a batch larger than a student's training split: the loader would have to cut it, while the
    ``batch_size`` constant of the method specs (and any weight derived from it) kept the config's value."""
    if isinstance(dataset.train, streamed_data.StreamedSplit):
        streamed_data.check_supported(cfg, run_methods)
    n, why = len(dataset.student_train), ""
    if cfg.labels_per_class is not None:
        why = f" (labels_per_class={cfg.labels_per_class})"
    meta = [name for name, m in run_methods.items() if m.needs.meta_prefix is not None]
    if meta:  # those methods train on the rest after their meta set is held out
        held = len(hold_out(dataset.student_train, cfg.meta_per_class, cfg.data_seed)[1])
        n, why = n - held, f"{why} after the meta set of {meta[0]!r} is held out (meta_per_class={cfg.meta_per_class})"
    if cfg.batch_size > n:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the student's training split: {n} examples"
                         f"{why}; set batch_size <= {n}")


def fit(runner: Runner, cfg: config_lib.Config, dataset: Data, evaluation: Evaluation, *, run: str, seed: int,
        state, split: data.Split, steps: int, lr_schedule, config: dict, meta: data.Split | None = None,
        meta_prefix: str | None = None, cache: teacher_caches.TeacherCache | None = None) -> tuple[Any, dict[str, float]]:
    """One run of the experiment through :meth:`experiments.runner.Runner.fit`. With ``meta``, every batch also
    carries a batch of it under ``meta_prefix`` (``meta_image``, ``meta_label``: for methods with a held-out
    meta objective, e.g. TGeo-KD); meta batches hold at most the meta split (a few examples per class)."""
    # Methods that index a per-example memory (CRD) read each example's row in `split`.
    with runner.phases.phase("batches"):
        loaders = {"train": train_loader(cfg, dataset, split, seed,
                                         with_index="index" in state.method.needs.batch_keys)}
        if cache is not None:  # teacher_cache: the batches carry the cached teacher's rows
            loaders["train"] = cached_train_loader(cfg, dataset, split, seed, cache,
                                                   with_index="index" in state.method.needs.batch_keys)
        if meta is not None:
            loaders["meta"] = train_loader(cfg, dataset, meta, seed + 10_000, batch_size=min(cfg.batch_size, len(meta)))
    combine = (lambda b: with_meta(b["train"], b["meta"], meta_prefix)) if meta is not None else None
    return runner.fit(run=run, seed=seed, state=state, loaders=loaders, steps=steps, lr_schedule=lr_schedule,
                      config=config, evaluation=evaluation, combine=combine)


@dataclasses.dataclass
class Plan:
    """Which participants each method needs, and which teachers must be trained first."""

    methods: dict[str, methods.Method]
    frozen_teachers: list[str]  # trained in the teacher phase, distilled from frozen


def plan(cfg: config_lib.Config, run_methods: dict[str, methods.Method]) -> Plan:
    known = {"teacher", *cfg.teachers}
    frozen: list[str] = []
    for name, method in run_methods.items():
        for participant in method.needs.learned_from:  # the trained ones are built with the student
            if participant not in known:
                raise ValueError(
                    f"config methods[{name!r}] reads participant {participant!r}, but the config defines teachers "
                    f"{sorted(known)} (add it to `teachers`)"
                )
            if participant not in frozen:
                frozen.append(participant)
    return Plan(run_methods, frozen)


def teacher_model_spec(cfg: config_lib.Config, name: str) -> tuple[str, dict]:
    if name == "teacher":
        return cfg.teacher, dict(cfg.teacher_kwargs)
    entry = cfg.teachers[name]
    return entry["model"], dict(entry.get("kwargs", {}))


def frozen_participant(cfg: config_lib.Config, model, name: str, variables) -> jaxkd.Participant:
    """The frozen teacher ``name`` as students see it: in ``cfg.frozen_dtype`` (its architecture built with
    that compute dtype, its parameters cast to it)."""
    arch, kwargs = teacher_model_spec(cfg, name)
    if cfg.frozen_dtype == "float32":
        return jaxkd.Participant(model((arch, kwargs)), variables, trains=False)
    dtype = jnp.dtype(cfg.frozen_dtype)
    return jaxkd.Participant(model((arch, {**kwargs, "dtype": dtype})), cast_params(variables, dtype), trains=False)


def trained_model_spec(cfg: config_lib.Config, name: str) -> tuple[str, dict]:
    """The architecture of a participant trained next to the student: an online teacher has the teacher's,
    a peer ``cfg.peer`` (default: the student's)."""
    if name == "teacher" or name in cfg.teachers:
        return teacher_model_spec(cfg, name)
    if cfg.peer is not None:
        return cfg.peer, dict(cfg.peer_kwargs)
    return cfg.student, dict(cfg.student_kwargs)


def with_precision(cfg: config_lib.Config, spec: tuple[str, dict]) -> tuple[str, dict]:
    """A trained participant's model spec under ``cfg.precision`` (:func:`jaxkd.precision.model_kwargs`: the
    compute ``dtype``; parameters, optimizer state and logits stay float32). Under ``"float32"`` the spec is
    left as it is: float32 is the zoo's default, and the same spec builds the same Model object as the
    teacher phase's (one compiled program for both)."""
    if cfg.precision == "float32":
        return spec
    return spec[0], precision.model_kwargs(precision.policy(cfg.precision), spec[1])


#: The experiment's PRNG: conv-net initialization compiles ~5x faster on CPU with rbg keys than with
#: threefry, and their quality is ample for initialization, shuffling and dropout.
PRNG_IMPL = "rbg"


def run_experiment(cfg: config_lib.Config, out_dir: str) -> dict[str, Any]:
    """Runs ``cfg`` into ``out_dir`` (resuming what is there). Keys are :data:`PRNG_IMPL` inside the run only:
    importing this module or running it leaves the process's default PRNG as it was."""
    with jax.default_prng_impl(PRNG_IMPL):
        return _run_experiment(cfg, out_dir)


def _run_experiment(cfg: config_lib.Config, out_dir: str) -> dict[str, Any]:
    phases = Phases()
    run_plan = plan(cfg, parse_methods(cfg))  # a bad spec fails before anything is loaded or trained
    check_teacher_cache(cfg, run_plan)
    with phases.phase("data"):
        dataset = load_data(cfg)
    check_batch_size(cfg, dataset, parse_methods(cfg))
    num_classes = dataset.train.num_classes
    run_plan = plan(cfg, parse_methods(cfg, num_examples=len(dataset.student_train)))

    built: dict[str, Any] = {}

    def model(spec: tuple[str, dict]):
        """One Model object per architecture: states built from the same objects share compiled steps."""
        key = json.dumps([spec[0], spec[1]], sort_keys=True, default=str)
        if key not in built:
            built[key] = models.get(spec[0], num_classes=num_classes, **spec[1])
        return built[key]

    student = model(with_precision(cfg, (cfg.student, dict(cfg.student_kwargs))))
    teacher_schedule = schedule_of(cfg, cfg.teacher_lr, cfg.teacher_steps)
    student_schedule = schedule_of(cfg, cfg.lr, cfg.steps)
    teacher_tx, student_tx = make_optimizer(cfg, teacher_schedule), make_optimizer(cfg, student_schedule)
    ce = methods.parse("ce")
    if isinstance(dataset.train, streamed_data.StreamedSplit):
        sample = streamed_data.sample_batch(cfg, dataset.train)
    else:
        sample = data.Loader(dataset.train.images[: cfg.batch_size], dataset.train.labels[: cfg.batch_size],
                             batch_size=min(cfg.batch_size, len(dataset.train))).batch((0, 0))
    shared = data_config(cfg)

    train_teachers = cfg.teacher_checkpoint is None
    frozen = run_plan.frozen_teachers
    total = len(cfg.seeds) * (len(run_plan.methods) * cfg.steps + (cfg.teacher_steps * len(frozen) if train_teachers else 0))
    progress = progress_bar(total)
    rows: dict[str, report.Row] = {}

    def add(row: str, model_name: str, method_text: str, result: dict, key: str = "accuracy", *,
            compare: bool = True) -> None:
        entry = rows.setdefault(row, report.Row(row, {"model": model_name, "method": method_text}, [],
                                                compare=compare))
        # The teacher-student distances (cfg.eval_metrics) of a run that reads the teacher: extra columns.
        distances = {k: result[k] for k in DISTANCE_COLUMNS if k in result} if key == "accuracy" else {}
        entry.per_seed.append({"accuracy": result[key], **distances})
        entry.ms_per_step.append(result.get("ms_per_step") if key == "accuracy" else None)

    started = time.time()
    mesh = sharding.make_mesh(cfg.mesh) if cfg.mesh is not None else None
    if mesh is not None:
        sharding.check_batch_size(cfg.batch_size, mesh)
    # Frozen teachers are scored once per seed (the teacher phase), not at every evaluation.
    eval_step = jaxkd.make_eval_step(mesh=mesh, frozen=False)
    evaluation = Evaluation(lambda state: jaxkd.evaluate(state, dataset.test_batches, eval_step), prefix="test_",
                            progress=("accuracy", ".3f"))
    distance_evaluation = evaluation
    if cfg.eval_metrics:  # runs that read the teacher are also scored by their distance to it
        distance_step = jaxkd.make_eval_step(mesh=mesh, frozen=False, metrics=(
            eval_metrics.top1(), *(getattr(eval_metrics, m)() for m in cfg.eval_metrics)))
        distance_evaluation = Evaluation(lambda state: jaxkd.evaluate(state, dataset.test_batches, distance_step),
                                         prefix="test_", progress=("accuracy", ".3f"))
    with PreemptionFlag() as preemption:
        runner = Runner(out_dir, progress=progress, preemption=preemption, phases=phases, eval_every=cfg.eval_every,
                        checkpoint_every=cfg.checkpoint_every, tensorboard=cfg.tensorboard, mesh=mesh)
        try:
            # Teachers first, for every seed; then each method over the seeds, so a method's compiled
            # programs serve all its seeds, and are dropped before the next method (each run compiles
            # its own: a 100-run comparison otherwise exhausts the process's memory maps on CPU).
            teacher_vars, teacher_prints = {}, {}
            for seed in cfg.seeds:
                teacher_rng, _ = jax.random.split(jax.random.PRNGKey(seed))
                teacher_vars[seed], teacher_prints[seed] = {}, {}
                for name in frozen:
                    spec = teacher_model_spec(cfg, name)
                    teacher = model(spec)
                    abstract = jax.eval_shape(teacher.init, teacher_rng, sample["image"])
                    if train_teachers or name != "teacher":
                        run = run_row(name)
                        with phases.phase("setup"):
                            state = jaxkd.create(student=teacher, method=ce, tx=teacher_tx, sample_batch=sample,
                                                 rng=teacher_rng, mesh=mesh)
                        config = {**shared, "run": run, "seed": seed, "model": spec[0], "kwargs": spec[1],
                                  "steps": cfg.teacher_steps, "lr": cfg.teacher_lr}
                        state, _ = fit(runner, cfg, dataset, evaluation, run=run, seed=seed, state=state,
                                       split=dataset.train, steps=cfg.teacher_steps, lr_schedule=teacher_schedule,
                                       config=config)
                        teacher_dir = os.path.join(out_dir, "teachers", f"seed{seed}", name)
                        with phases.phase("checkpoints"):
                            save_variables(teacher_dir, jax.device_get(state.student.variables()))
                        del state
                    else:
                        teacher_dir = cfg.teacher_checkpoint.format(seed=seed)
                    # Distill from the checkpoint on disk, exactly what a later run would load.
                    with phases.phase("setup"):
                        if not train_teachers and name == "teacher" and config_lib.is_torch_checkpoint(teacher_dir):
                            # A published PyTorch teacher (RepDistiller's ckpt_epoch_240.pth, a .safetensors file).
                            teacher_vars[seed][name] = models.load_torch(
                                spec[0], teacher_dir, num_classes=num_classes, input_shape=sample["image"].shape)
                        else:
                            teacher_vars[seed][name] = load_variables(teacher_dir, abstract)
                        teacher_prints[seed][name] = teacher_fingerprint(teacher_vars[seed][name])
                        evaluated = jaxkd.create(student=teacher, method=ce, tx=teacher_tx, sample_batch=sample,
                                                 rng=teacher_rng, student_variables=teacher_vars[seed][name],
                                                 mesh=mesh)
                    with phases.phase("evaluation"):
                        add(run_row(name), spec[0], "ce (full train split)", evaluation.evaluate(evaluated),
                            compare=False)
            jax.clear_caches()
            for name, method in run_plan.methods.items():
                for seed in cfg.seeds:
                    _, student_rng = jax.random.split(jax.random.PRNGKey(seed))
                    needs = method.needs
                    participants = {}
                    for p in needs.participants:
                        if p in needs.trained:
                            spec = with_precision(cfg, trained_model_spec(cfg, p))
                            participants[p] = jaxkd.Participant(model(spec))
                        else:
                            participants[p] = frozen_participant(cfg, model, p, teacher_vars[seed][p])
                    cache, method_sample = None, sample
                    if uses_teacher_cache(cfg, method):
                        with phases.phase("setup"):  # the teacher runs once over the split
                            cache = teacher_cache(cfg, dataset, out_dir, seed, participants["teacher"])
                        participants["teacher"] = teacher_caches.cached_teacher(cache)
                        method_sample = {**sample, **cache.entries(np.arange(len(sample["label"])))}
                    train_split, meta_split = dataset.student_train, None
                    if needs.meta_prefix is not None:
                        train_split, meta_split = hold_out(dataset.student_train, cfg.meta_per_class, cfg.data_seed)
                    with phases.phase("setup"):
                        state = jaxkd.create(
                            student=student, method=method, tx=student_tx, rng=student_rng, participants=participants,
                            sample_batch=with_meta(with_index(method_sample, method), sample, needs.meta_prefix),
                            mesh=mesh,
                        )
                    config = {**shared, "run": name, "seed": seed, "method": cfg.methods[name], "student": cfg.student,
                              "frozen_dtype": cfg.frozen_dtype, "precision": cfg.precision,
                              "student_kwargs": cfg.student_kwargs, "steps": cfg.steps, "lr": cfg.lr,
                              "participants": {p: list(trained_model_spec(cfg, p)) for p in needs.trained},
                              "teachers": {p: teacher_prints[seed][p] for p in needs.learned_from}}
                    if cache is not None:  # a resume with another cache setting is refused
                        config["teacher_cache"] = teacher_caches.TeacherCache.settings(cache)
                    # Distances to the teacher need its outputs on the test images, which a cache does not hold.
                    scored = distance_evaluation if "teacher" in needs.participants and cache is None else evaluation
                    state, result = fit(runner, cfg, dataset, scored, run=name, seed=seed, state=state,
                                        split=train_split, steps=cfg.steps, lr_schedule=student_schedule,
                                        config=config, meta=meta_split, meta_prefix=needs.meta_prefix, cache=cache)
                    add(name, cfg.student, cfg.methods[name], result)
                    for p in needs.trained:
                        add(f"{name}/{p}", trained_model_spec(cfg, p)[0], f"{cfg.methods[name]} ({p})", result,
                            f"{p}_accuracy", compare=False)
                    del state
                jax.clear_caches()
        finally:
            runner.close()
            progress.close()

    with phases.phase("report"):
        num_train, num_student = len(dataset.train), len(dataset.student_train)
        labeled = f"{num_student} labeled" if num_student != num_train else f"all {num_train}"
        num_test = getattr(dataset.test_batches, "num_examples", None)  # streamed: not read again to count
        if num_test is None:
            num_test = int(sum(b["mask"].sum() for b in dataset.test_batches))
        caption = (f"{cfg.dataset}: teacher trained on {num_train} images for {cfg.teacher_steps} steps; student "
                   f"on {labeled} images for {cfg.steps} steps; test top-1 on {num_test} images after the last "
                   f"step, mean ± std over seeds {tuple(cfg.seeds)}.")
        columns = [report.Metric("accuracy", "top1", "top-1 (%)", 100.0, 2)]
        if "agreement" in cfg.eval_metrics:
            columns.append(report.Metric("agreement", "agreement", "agreement (%)", 100.0, 2))
        if "teacher_student_kl" in cfg.eval_metrics:
            columns.append(report.Metric("kl", "kl", "KL(t‖s)", 1.0, 4))
            caption += " KL(t‖s): the teacher-student KL at T = 1 on the test images, in nats."
        summary = report.summarize(list(rows.values()), columns,
                                   baseline="scratch", caption=caption, seconds=time.time() - started)
        summary["config"] = dataclasses.asdict(cfg)
        report.plot_curves(os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "learning_curves.png"),
                           [("loss", "train loss"), ("test_accuracy", "test top-1")], log_scale=("loss",),
                           smooth=("loss",))
    summary["time"] = phases.breakdown()
    summary["compiles"] = compilation_cache.compile_counts()
    report.write(out_dir, summary)
    return summary


# ----- cached teachers (config.teacher_cache) -----

def uses_teacher_cache(cfg: config_lib.Config, method: methods.Method) -> bool:
    """Whether ``method``'s frozen ``teacher`` is read from the cache (with ``teacher_cache`` set)."""
    return cfg.teacher_cache is not None and "teacher" in method.needs.learned_from


def check_teacher_cache(cfg: config_lib.Config, run_plan: Plan) -> None:
    """Refuses, before anything trains, a ``teacher_cache`` the config's augmentation or methods cannot use."""
    if cfg.teacher_cache is None:
        return
    if cfg.teacher_cache == "fixed" and cfg.augment != "none":
        raise ValueError(f"teacher_cache='fixed' caches the teacher's logits of un-augmented images, but augment="
                         f"{cfg.augment!r}: use teacher_cache='fkd' (stored random views) or augment='none'")
    if cfg.teacher_cache == "fkd" and cfg.augment == "none":
        raise ValueError("teacher_cache='fkd' stores random augmented views, but augment='none': use "
                         "teacher_cache='fixed'")
    for name, method in run_plan.methods.items():
        if not uses_teacher_cache(cfg, method):
            continue
        others = [p for p in method.needs.learned_from if p != "teacher"]
        if others or method.needs.meta_prefix is not None:
            why = f"it also reads the frozen teachers {others}" if others else "it trains on a held-out meta set"
            raise ValueError(f"teacher_cache={cfg.teacher_cache!r} serves the frozen 'teacher' of methods that read "
                             f"only it, but methods[{name!r}] cannot use it: {why}")


def cached_train_loader(cfg: config_lib.Config, dataset: Data, split: data.Split, seed: int,
                        cache: teacher_caches.TeacherCache, *, with_index: bool) -> data.Loader:
    """:func:`train_loader`'s batches plus the cached teacher's rows (FKD: replaying the stored views)."""
    return teacher_caches.CachedTeacherLoader(
        split.images, split.labels, cache=cache, batch_size=cfg.batch_size, mean=dataset.mean, std=dataset.std,
        shuffle=True, seed=seed, num_epochs=None, num_classes=split.num_classes, with_index=with_index,
    )


def teacher_cache(cfg: config_lib.Config, dataset: Data, out_dir: str, seed: int,
                  teacher: jaxkd.Participant) -> teacher_caches.TeacherCache:
    """The frozen teacher's cache over the student's training split, written once per seed under
    ``<out>/teacher_cache/seed<seed>/`` (a run resumed with another teacher or setting is refused)."""
    path = os.path.join(out_dir, "teacher_cache", f"seed{seed}", f"teacher-{cfg.teacher_cache}")
    subset = "" if cfg.labels_per_class is None else f"[labels_per_class={cfg.labels_per_class}]"
    settings = dict(kind=cfg.teacher_cache, mean=dataset.mean, std=dataset.std, dataset=cfg.dataset,
                    split=f"{cfg.train_split}{subset}", seed=seed, batch_size=cfg.eval_batch_size)
    if cfg.teacher_cache == "fkd":
        settings.update(augment=cfg.augment, num_views=cfg.teacher_cache_views, k=cfg.teacher_cache_k)
    return teacher_caches.load_or_write_teacher_cache(path, teacher.model, teacher.variables,
                                                      dataset.student_train.images, **settings)


def teacher_fingerprint(variables) -> dict[str, str]:
    """What a run's checkpoint records of a frozen teacher: a hash of its tree structure, shapes and dtypes,
    and one of its values (``jaxkd.checkpoint.fingerprint``), so a resume with another teacher is refused."""
    print_ = fingerprint(variables)
    structure = hashlib.sha256(json.dumps(print_["leaves"], sort_keys=True).encode()).hexdigest()
    return {"structure": structure, "values": print_["sha256"]}


def run_row(teacher_name: str) -> str:
    return "teacher" if teacher_name == "teacher" else f"teacher:{teacher_name}"


def time_line(summary: dict[str, Any]) -> str:
    counts = summary["compiles"]
    return (f"\ntime by phase: {describe(summary['time'])} ({counts['compiled']} programs compiled, "
            f"{counts['loaded']} loaded from the compilation cache)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_command(argv, run_experiment, description=__doc__, config_type=config_lib.Config,
                       default_config=os.path.join(os.path.dirname(__file__), "configs", "digits.py"),
                       epilogue=time_line)


if __name__ == "__main__":
    # The importable module's classes, not __main__'s copies: config files import them from there.
    from experiments import distill

    entry_point(distill.main)
